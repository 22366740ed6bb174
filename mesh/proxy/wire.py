"""A cheap read of one string field from serialized protobuf bytes, without parsing.

Routing an Inference call by its `model` (field 1 of GenerateRequest and EmbedRequest)
must not cost a full deserialization on the hot path; this walks the wire format just far
enough to find the field, skipping every other field by its wire type.
"""

from __future__ import annotations

from collections.abc import Iterator


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


def _fields(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """Walks the top-level fields: (number, wire type, start of the field, start of its
    value, end). A varint's value is read for the caller from `start of its value`.
    Raises ValueError on bytes that are not valid protobuf (or use groups, which our
    contracts never do)."""
    pos, end = 0, len(data)
    while pos < end:
        start = pos
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        value = pos
        if wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            length, value = _varint(data, pos)
            pos = value + length
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire_type} (groups) is not supported")
        if pos > end:
            raise ValueError("truncated field")
        yield number, wire_type, start, value, pos


def read_string_field(data: bytes, field_number: int) -> str | None:
    """The last value of a length-delimited field (proto3 semantics), or None if absent.

    Returns None too for bytes that are not valid protobuf: the caller then routes as if
    the field were missing, and the backend answers the malformed request itself.
    """
    found: str | None = None
    try:
        for number, wire_type, _, value, end in _fields(data):
            if number == field_number and wire_type == 2:
                found = data[value:end].decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    return found


def read_usage(data: bytes, field_number: int) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of the `Usage` message in `field_number` (fields
    1 and 2 in it), read off the wire; (0, 0) if absent or malformed."""
    usage = (0, 0)
    try:
        for number, wire_type, _, value, end in _fields(data):
            if number == field_number and wire_type == 2:
                counts = {1: 0, 2: 0}
                inner = data[value:end]
                for n, t, _, v, _ in _fields(inner):
                    if n in counts and t == 0:
                        counts[n] = _varint(inner, v)[0]
                usage = (counts[1], counts[2])
    except ValueError:
        return 0, 0
    return usage


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
    kept = [_encode_varint(field_number << 3 | 2) + _encode_varint(len(encoded)) + encoded]
    try:
        for number, wire_type, start, _, end in _fields(data):
            if not (number == field_number and wire_type == 2):
                kept.append(data[start:end])
    except ValueError:
        return data
    return b"".join(kept)
