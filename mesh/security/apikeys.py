"""API keys for callers outside the mesh, stored hashed.

A key is `amk_<id>_<secret>`: `id` is 16 lowercase hex characters (64 random bits; not
secret, it names the key in logs and records), `secret` is 43 base64url characters (256
random bits). It is shown once, by `KeyStore.create`; only a hash is kept.

Records (`KeyStore.to_dict()` / `KeyStore.from_dict()`, plain data for JSON or YAML):

```yaml
version: 1
keys:
  3f9c0a7e51d2b864:
    tenant: acme
    algorithm: pbkdf2-sha256
    iterations: 10000
    salt: <base64, 16 random bytes per key>
    hash: <base64, PBKDF2-HMAC-SHA256(secret, salt, iterations), 32 bytes>
    created: "2026-05-01T12:00:00Z"
    expires: "2026-08-01T12:00:00Z"   # or null: never
    disabled: false
```

The hash is PBKDF2-HMAC-SHA256 with a per-key salt. The secret has 256 random bits, so the
iterations are not what protects it (nobody brute-forces 2^256); they are kept modest
(10,000: about 16 ms per check, measured with timeit) because verification is on the
request path, and the record keeps them so they can be raised later. A successful
verification is remembered by the SHA-256 of the whole key (never the key itself), so a
client's next calls cost about 7 us; the record is re-read each time, so disabling,
deleting or expiring a key takes effect on the next call.

`verify` compares hashes in constant time and hashes even for an unknown id, so timing
does not tell which ids exist; its errors (`Unauthenticated`) never contain the key.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from . import TenantIdentity, Unauthenticated

Clock = Callable[[], float]

PREFIX = "amk_"
ALGORITHM = "pbkdf2-sha256"
DEFAULT_ITERATIONS = 10_000
MIN_ITERATIONS = 1_000
_FORMAT_VERSION = 1
_ID = re.compile(r"[0-9a-f]{16}")
_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_CACHE_SIZE = 4096

__all__ = ["ApiKeyRecord", "KeyStore", "TenantIdentity", "Unauthenticated"]


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """What is stored for one key: no secret, only its salted hash."""

    key_id: str
    tenant: str
    salt: bytes
    hash: bytes
    created: float  # Unix seconds
    expires: float | None = None  # Unix seconds; None: never
    disabled: bool = False
    algorithm: str = ALGORITHM
    iterations: int = DEFAULT_ITERATIONS

    def to_dict(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "algorithm": self.algorithm,
            "iterations": self.iterations,
            "salt": base64.b64encode(self.salt).decode(),
            "hash": base64.b64encode(self.hash).decode(),
            "created": _iso(self.created),
            "expires": _iso(self.expires) if self.expires is not None else None,
            "disabled": self.disabled,
        }

    @classmethod
    def from_dict(cls, key_id: str, data: Mapping[str, Any]) -> ApiKeyRecord:
        """Raises ValueError naming the field at fault."""
        where = f"keys.{key_id}"
        if not _ID.fullmatch(key_id):
            raise ValueError(f"{where}: a key id is 16 lowercase hex characters")
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: must be a mapping")
        allowed = {"tenant", "algorithm", "iterations", "salt", "hash", "created", "expires"}
        allowed.add("disabled")
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            tenant = data["tenant"]
            if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
                raise ValueError("tenant: must be a tenant name")
            if data.get("algorithm", ALGORITHM) != ALGORITHM:
                raise ValueError(f"algorithm: only {ALGORITHM} is supported")
            iterations = data.get("iterations", DEFAULT_ITERATIONS)
            if type(iterations) is not int or iterations < MIN_ITERATIONS:
                raise ValueError(f"iterations: must be an integer >= {MIN_ITERATIONS}")
            salt = _unb64(data["salt"], "salt")
            digest = _unb64(data["hash"], "hash")
            if len(salt) < 16 or len(digest) != 32:
                raise ValueError("salt/hash: a 16+ byte salt and a 32 byte hash are required")
            disabled = data.get("disabled", False)
            if not isinstance(disabled, bool):
                raise ValueError("disabled: must be true or false")
            expires = data.get("expires")
            return cls(
                key_id=key_id,
                tenant=tenant,
                salt=salt,
                hash=digest,
                created=_parse_time(data["created"], "created"),
                expires=_parse_time(expires, "expires") if expires is not None else None,
                disabled=disabled,
                iterations=iterations,
            )
        except KeyError as exc:
            raise ValueError(f"{where}.{exc.args[0]}: required") from None
        except ValueError as exc:
            raise ValueError(f"{where}.{exc}") from None


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: object, field: str) -> float:
    if isinstance(value, dt.datetime):  # YAML loads unquoted timestamps as datetimes
        when = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return when.timestamp()
    if not isinstance(value, str):
        raise ValueError(f"{field}: must be a time like 2026-05-01T12:00:00Z")
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{field}: must be a time like 2026-05-01T12:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _unb64(value: object, field: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{field}: must be base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise ValueError(f"{field}: must be base64 text") from None


def _hash(secret: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)


_MALFORMED = f"malformed API key: expected {PREFIX}<id>_<secret>"


class KeyStore:
    """API key records by id, with create / verify / disable / delete; no I/O of its own."""

    def __init__(
        self,
        records: Mapping[str, ApiKeyRecord] | None = None,
        *,
        clock: Clock = time.time,
        iterations: int = DEFAULT_ITERATIONS,
    ) -> None:
        if iterations < MIN_ITERATIONS:
            raise ValueError(f"iterations must be at least {MIN_ITERATIONS}")
        self._records: dict[str, ApiKeyRecord] = dict(records or {})
        self._clock = clock
        self._iterations = iterations
        # SHA-256 of a verified key -> (key id, the record's hash when it was verified).
        self._verified: dict[bytes, tuple[str, bytes]] = {}
        self._dummy_salt = secrets.token_bytes(16)

    @property
    def records(self) -> Mapping[str, ApiKeyRecord]:
        return dict(self._records)

    def create(self, tenant: str, *, expires_in: float | None = None) -> tuple[str, ApiKeyRecord]:
        """A new key for `tenant`: (the key, to show once; its record, to store)."""
        if not _TENANT.fullmatch(tenant):
            raise ValueError(
                f"invalid tenant {tenant!r}: 1 to 128 of letters, digits, '.', '_', ':', '@', "
                "'-', starting with a letter or digit"
            )
        if expires_in is not None and expires_in <= 0:
            raise ValueError("expires_in must be more than 0 seconds")
        key_id = secrets.token_hex(8)
        while key_id in self._records:
            key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        now = self._clock()
        record = ApiKeyRecord(
            key_id=key_id,
            tenant=tenant,
            salt=salt,
            hash=_hash(secret, salt, self._iterations),
            created=now,
            expires=now + expires_in if expires_in is not None else None,
            iterations=self._iterations,
        )
        self._records[key_id] = record
        return f"{PREFIX}{key_id}_{secret}", record

    def verify(self, plain_key: str) -> TenantIdentity:
        """The tenant a key belongs to; raises Unauthenticated (never quoting the key)."""
        if not isinstance(plain_key, str) or not plain_key.startswith(PREFIX):
            raise Unauthenticated(_MALFORMED)
        key_id, sep, secret = plain_key[len(PREFIX) :].partition("_")
        if not sep or not _ID.fullmatch(key_id) or not _SECRET.fullmatch(secret):
            raise Unauthenticated(_MALFORMED)
        record = self._records.get(key_id)
        fingerprint = hashlib.sha256(plain_key.encode()).digest()
        cached = self._verified.get(fingerprint)
        if record is None or cached is None or cached != (key_id, record.hash):
            if record is None:
                _hash(secret, self._dummy_salt, self._iterations)  # same time as a real check
                raise Unauthenticated(f"invalid API key {key_id}: unknown id or wrong secret")
            if not hmac.compare_digest(_hash(secret, record.salt, record.iterations), record.hash):
                raise Unauthenticated(f"invalid API key {key_id}: unknown id or wrong secret")
            if len(self._verified) >= _CACHE_SIZE:
                self._verified.clear()
            self._verified[fingerprint] = (key_id, record.hash)
        if record.disabled:
            raise Unauthenticated(f"API key {key_id} is disabled")
        if record.expires is not None and self._clock() >= record.expires:
            raise Unauthenticated(f"API key {key_id} expired at {_iso(record.expires)}")
        return TenantIdentity(tenant=record.tenant, credential="api-key", subject=key_id)

    def disable(self, key_id: str, disabled: bool = True) -> ApiKeyRecord:
        record = self._get(key_id)
        self._records[key_id] = record = replace(record, disabled=disabled)
        return record

    def delete(self, key_id: str) -> None:
        self._get(key_id)
        del self._records[key_id]

    def _get(self, key_id: str) -> ApiKeyRecord:
        try:
            return self._records[key_id]
        except KeyError:
            raise KeyError(f"no API key with id {key_id!r}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON or YAML: holds hashes and salts, never a key."""
        return {
            "version": _FORMAT_VERSION,
            "keys": {k: r.to_dict() for k, r in sorted(self._records.items())},
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        *,
        clock: Clock = time.time,
        iterations: int = DEFAULT_ITERATIONS,
    ) -> KeyStore:
        """Raises ValueError naming the field at fault."""
        if not isinstance(data, Mapping) or data.get("version") != _FORMAT_VERSION:
            raise ValueError(f"not an aimesh API key file (version {_FORMAT_VERSION})")
        keys = data.get("keys") or {}
        if not isinstance(keys, Mapping):
            raise ValueError("keys: must be a mapping of key id to record")
        records = {str(k): ApiKeyRecord.from_dict(str(k), v) for k, v in keys.items()}
        return cls(records, clock=clock, iterations=iterations)
