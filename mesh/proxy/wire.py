"""A cheap read of one string field from serialized protobuf bytes, without parsing.

Routing an Inference call by its `model` (field 1 of GenerateRequest and EmbedRequest)
must not cost a full deserialization on the hot path; this walks the wire format just far
enough to find the field, skipping every other field by its wire type.
"""

from __future__ import annotations


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def read_string_field(data: bytes, field_number: int) -> str | None:
    """The last value of a length-delimited field (proto3 semantics), or None if absent.

    Returns None too for bytes that are not valid protobuf: the caller then routes as if
    the field were missing, and the backend answers the malformed request itself.
    """
    found: str | None = None
    pos, end = 0, len(data)
    try:
        while pos < end:
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 2:
                length, pos = _varint(data, pos)
                if number == field_number:
                    found = data[pos : pos + length].decode("utf-8")
                pos += length
            elif wire_type == 5:
                pos += 4
            else:  # groups (3, 4) are not used by our contracts; give up politely
                return found
            if pos > end:
                return None
    except (ValueError, UnicodeDecodeError):
        return None
    return found


def read_usage(data: bytes, field_number: int) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of the `Usage` message in `field_number` (fields
    1 and 2 in it), read off the wire; (0, 0) if absent or malformed."""
    prompt = completion = 0
    pos, end = 0, len(data)
    try:
        while pos < end:
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 2:
                length, pos = _varint(data, pos)
                if number == field_number:
                    prompt, completion = _usage(data[pos : pos + length])
                pos += length
            elif wire_type == 5:
                pos += 4
            else:
                break
    except ValueError:
        return 0, 0
    return prompt, completion


def _usage(data: bytes) -> tuple[int, int]:
    values = {1: 0, 2: 0}
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(data, pos)
            if number in values:
                values[number] = value
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            length, pos = _varint(data, pos)
            pos += length
        elif wire_type == 5:
            pos += 4
        else:
            break
    return values[1], values[2]


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def replace_string_field(data: bytes, field_number: int, value: str) -> bytes:
    """`data` with every occurrence of a length-delimited field dropped and `value` put in
    its place (at the front: proto3 takes the last value, and only one is left). Used to
    ask a failover destination for its own model without parsing the request. Bytes that
    are not valid protobuf are returned unchanged (the backend will say what is wrong)."""
    encoded = value.encode("utf-8")
    head = _encode_varint(field_number << 3 | 2) + _encode_varint(len(encoded)) + encoded
    kept: list[bytes] = [head]
    pos, end = 0, len(data)
    try:
        while pos < end:
            start = pos
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 2:
                length, pos = _varint(data, pos)
                pos += length
            elif wire_type == 5:
                pos += 4
            else:
                return data
            if pos > end:
                return data
            if not (number == field_number and wire_type == 2):
                kept.append(data[start:pos])
    except ValueError:
        return data
    return b"".join(kept)
