"""SPIFFE IDs: build and validate them, match them against patterns, read one from a cert.

A SPIFFE ID (the SPIFFE ID standard, github.com/spiffe/spiffe, standards/SPIFFE-ID.md) is
`spiffe://<trust domain><path>`:

- the scheme is `spiffe`, in lowercase;
- the trust domain is 1 to 255 of `a-z 0-9 . - _` (lowercase only; no port, no user info);
- the path is zero or more `/segment`s, each non-empty, of `A-Z a-z 0-9 . - _`, and not `.`
  or `..`; no trailing slash, no percent-encoding, no query, no fragment;
- the whole ID is at most 2048 bytes.

aimesh workloads are `spiffe://<trust domain>/ns/<namespace>/sa/<service>` (`spiffe_id`).

Patterns (`compile_pattern`, used by authorization rules and join tokens) are SPIFFE IDs in
which `*` is a wildcard, matched per segment, like a shell glob:

- `*` inside a segment (or the trust domain) matches any run of characters except `/`:
  `spiffe://prod.mesh/ns/*/sa/gpt4-*`; a segment that is just `*` matches exactly one
  whole segment;
- a segment that is exactly `**` matches one or more whole segments:
  `spiffe://prod.mesh/ns/batch/**` matches every ID under `/ns/batch/`;
- the pattern `*` on its own matches every SPIFFE ID.

There is no `?`, no character class and no escaping (none of those characters can occur in
a SPIFFE ID anyway); a pattern without `*` matches exactly one ID.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509

SCHEME = "spiffe://"
# The mesh's own namespace: operators (`aimesh identity issue`) and the control plane.
SYSTEM_NAMESPACE = "aimesh-system"
CONTROL_PLANE_SA = "control-plane"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

_TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")
_SEGMENT_RULE = "letters, digits, '.', '-' and '_'"
_TRUST_DOMAIN_RULE = "lowercase letters, digits, '.', '-' and '_'"


def _show(value: str) -> str:
    return repr(value if len(value) <= 120 else value[:117] + "...")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed, valid SPIFFE ID; `str()` gives it back exactly."""

    trust_domain: str
    path: str  # "" or "/seg/seg..."

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path[1:].split("/")) if self.path else ()

    @property
    def namespace(self) -> str | None:
        """`<ns>` of an aimesh workload ID `/ns/<ns>/sa/<service>`, else None."""
        s = self.segments
        return s[1] if len(s) == 4 and s[0] == "ns" and s[2] == "sa" else None

    @property
    def service(self) -> str | None:
        """`<service>` of an aimesh workload ID `/ns/<ns>/sa/<service>`, else None."""
        s = self.segments
        return s[3] if len(s) == 4 and s[0] == "ns" and s[2] == "sa" else None


def validate_trust_domain(trust_domain: str, *, what: str = "trust domain") -> str:
    """Returns `trust_domain` if it is a valid SPIFFE trust domain, else raises ValueError."""
    if not trust_domain:
        raise ValueError(f"the {what} is empty")
    if len(trust_domain) > MAX_TRUST_DOMAIN_LENGTH:
        raise ValueError(
            f"the {what} is {len(trust_domain)} characters long; "
            f"the maximum is {MAX_TRUST_DOMAIN_LENGTH}"
        )
    for ch in trust_domain:
        if ch in _TRUST_DOMAIN_CHARS:
            continue
        if ch == ":":
            problem = "a port is not allowed"
        elif ch == "@":
            problem = "user info is not allowed"
        elif ch.isupper():
            problem = "it must be lowercase"
        else:
            problem = f"{ch!r} is not allowed; use {_TRUST_DOMAIN_RULE}"
        raise ValueError(f"the {what} {_show(trust_domain)} is invalid: {problem}")
    return trust_domain


def _check_segment(segment: str, value: str) -> None:
    if segment == "":
        raise ValueError(
            f"invalid SPIFFE ID {_show(value)}: empty path segment (a double or trailing slash)"
        )
    if segment in (".", ".."):
        raise ValueError(
            f"invalid SPIFFE ID {_show(value)}: dot segment {segment!r} is not allowed"
        )
    for ch in segment:
        if ch not in _SEGMENT_CHARS:
            hint = " (percent-encoding is not allowed)" if ch == "%" else ""
            raise ValueError(
                f"invalid SPIFFE ID {_show(value)}: {ch!r} in path segment {_show(segment)} "
                f"is not allowed{hint}; use {_SEGMENT_RULE}"
            )


def _split(value: str, what: str) -> tuple[str, str]:
    """`spiffe://td/path` -> (td, "/path"), checking scheme, length, query and fragment."""
    if not value:
        raise ValueError(f"the {what} is empty")
    size = len(value.encode())
    if size > MAX_ID_BYTES:
        raise ValueError(f"the {what} is {size} bytes long; the maximum is {MAX_ID_BYTES}")
    if not value.startswith(SCHEME):
        if value[: len(SCHEME)].lower() == SCHEME:
            raise ValueError(f"invalid {what} {_show(value)}: the scheme must be lowercase")
        raise ValueError(f"invalid {what} {_show(value)}: it must start with {SCHEME}")
    rest = value[len(SCHEME) :]
    if "?" in rest:
        raise ValueError(f"invalid {what} {_show(value)}: a query is not allowed")
    if "#" in rest:
        raise ValueError(f"invalid {what} {_show(value)}: a fragment is not allowed")
    trust_domain, slash, path = rest.partition("/")
    return trust_domain, slash + path


def parse(value: str) -> SpiffeId:
    """Parses and validates a SPIFFE ID; raises ValueError naming what is wrong."""
    if not isinstance(value, str):
        raise ValueError(f"a SPIFFE ID must be a string, got {type(value).__name__}")
    trust_domain, path = _split(value, "SPIFFE ID")
    validate_trust_domain(trust_domain, what=f"trust domain of {_show(value)}")
    if path:
        for segment in path[1:].split("/"):
            _check_segment(segment, value)
    return SpiffeId(trust_domain, path)


def is_valid(value: str) -> bool:
    try:
        parse(value)
    except ValueError:
        return False
    return True


def spiffe_id(trust_domain: str, namespace: str, service: str) -> str:
    """The aimesh workload ID: `spiffe://<trust domain>/ns/<namespace>/sa/<service>`."""
    validate_trust_domain(trust_domain)
    value = f"{SCHEME}{trust_domain}/ns/{namespace}/sa/{service}"
    parse(value)
    return value


def trust_domain_id(trust_domain: str) -> str:
    """`spiffe://<trust domain>`, the ID of the trust domain itself (carried by its CAs)."""
    return f"{SCHEME}{validate_trust_domain(trust_domain)}"


# --- patterns ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdPattern:
    """A compiled SPIFFE ID pattern (see the module docstring for the syntax)."""

    text: str
    regex: re.Pattern[str] | None  # None: an exact ID, compared as a string

    @property
    def exact(self) -> bool:
        return self.regex is None

    def matches(self, spiffe_id: str) -> bool:
        """True if `spiffe_id` (assumed valid: parse it first if it is untrusted) matches."""
        if self.regex is None:
            return spiffe_id == self.text
        return self.regex.fullmatch(spiffe_id) is not None


_ANY_ID = r"spiffe://[a-z0-9._\-]+(?:/[A-Za-z0-9._\-]+)*"


def _glob(part: str, chars: frozenset[str], whole: str, rule: str) -> str:
    if part == "*":
        return "[^/]+"
    for ch in part:
        if ch != "*" and ch not in chars:
            raise ValueError(
                f"invalid SPIFFE ID pattern {_show(whole)}: {ch!r} in {part!r}; {rule}"
            )
    return "[^/]*".join(re.escape(p) for p in part.split("*"))


def compile_pattern(pattern: str) -> IdPattern:
    """Compiles a SPIFFE ID pattern; raises ValueError if it could never be a valid ID."""
    if pattern == "*":
        return IdPattern(pattern, re.compile(_ANY_ID, re.ASCII))
    if "*" not in pattern:
        parse(pattern)
        return IdPattern(pattern, None)
    what = "SPIFFE ID pattern"
    trust_domain, path = _split(pattern, what)
    if not trust_domain:
        raise ValueError(f"invalid {what} {_show(pattern)}: the trust domain is empty")
    if "**" in trust_domain:
        raise ValueError(f"invalid {what} {_show(pattern)}: '**' may only be a whole path segment")
    parts = [
        re.escape(SCHEME)
        + _glob(trust_domain, _TRUST_DOMAIN_CHARS, pattern, f"use {_TRUST_DOMAIN_RULE} or '*'")
    ]
    if path:
        for segment in path[1:].split("/"):
            if segment == "**":
                parts.append("[^/]+(?:/[^/]+)*")
                continue
            if "**" in segment:
                raise ValueError(
                    f"invalid {what} {_show(pattern)}: '**' may only be a whole path segment"
                )
            if "*" not in segment:
                _check_segment(segment, pattern)
                parts.append(re.escape(segment))
            else:
                parts.append(_glob(segment, _SEGMENT_CHARS, pattern, f"use {_SEGMENT_RULE} or '*'"))
    return IdPattern(pattern, re.compile("/".join(parts), re.ASCII))


class PatternSet:
    """Several patterns matched at once: a set lookup for exact IDs, one regex for the rest."""

    __slots__ = ("_exact", "_regex", "patterns")

    def __init__(self, patterns: Iterable[str]) -> None:
        compiled = [compile_pattern(p) for p in patterns]
        self.patterns = tuple(p.text for p in compiled)
        self._exact = frozenset(p.text for p in compiled if p.regex is None)
        wild = [p.regex.pattern for p in compiled if p.regex is not None]
        self._regex = re.compile("|".join(f"(?:{w})" for w in wild), re.ASCII) if wild else None

    def matches(self, spiffe_id: str) -> bool:
        if spiffe_id in self._exact:
            return True
        return self._regex is not None and self._regex.fullmatch(spiffe_id) is not None


# --- certificates --------------------------------------------------------------------------


def load_certificate(data: bytes | str | x509.Certificate) -> x509.Certificate:
    """One certificate from PEM (str or bytes) or DER bytes."""
    if isinstance(data, x509.Certificate):
        return data
    raw = data.encode() if isinstance(data, str) else data
    try:
        if raw.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(raw)
        return x509.load_der_x509_certificate(raw)
    except ValueError as exc:
        raise ValueError(f"not a readable X.509 certificate: {exc}") from None


def load_certificates(pem: bytes | str) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle (none if there is none)."""
    raw = pem.encode() if isinstance(pem, str) else pem
    if b"-----BEGIN" not in raw:
        return []
    try:
        return x509.load_pem_x509_certificates(raw)
    except ValueError as exc:
        raise ValueError(f"not a readable PEM certificate bundle: {exc}") from None


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def peer_spiffe_id(cert: bytes | str | x509.Certificate) -> str:
    """The SPIFFE ID of an X.509-SVID: its one URI SAN, validated. Raises ValueError."""
    c = load_certificate(cert)
    uris = uri_sans(c)
    if len(uris) != 1:
        found = "none" if not uris else ", ".join(_show(u) for u in uris)
        raise ValueError(
            "an X.509-SVID carries its SPIFFE ID in exactly one URI subject alternative "
            f"name; this certificate ({c.subject.rfc4514_string() or 'no subject'}) has "
            f"{len(uris)}: {found}"
        )
    parse(uris[0])
    return uris[0]
