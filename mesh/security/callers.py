"""Callers at the gateway: API keys and JWTs mapped to a tenant, as an inbound policy.

`aimesh proxy --api-keys FILE` (a key store written by `aimesh apikey create`) and/or
`--jwt-keys FILE --jwt-issuer ISS --jwt-audience AUD [--jwt-tenant-claim sub]` turn on
`CallerAuth`, which runs in the proxy's inbound stack after `Identity`:

- the credential comes from `authorization: Bearer <API key or JWT>` or from
  `x-api-key: <API key>`; an `amk_...` token is an API key, a token with two dots a JWT;
- a good one sets `call.identity` to `tenant:<name>` (what authorization rules match, see
  `authz`) and `call.facts.tenant` (metrics and audit records);
- a missing or bad one ends the call with UNAUTHENTICATED and a message saying what to
  send or what was wrong with it; the credential itself is never echoed or logged;
- the credential headers are not forwarded upstream (backends never see tenants' keys);
- health checks (`grpc.health.v1.Health`) and reflection stay open, so load balancers and
  tools like grpcurl need no credential; a caller with a mesh identity (an mTLS peer
  with a SPIFFE ID) and no credential keeps that identity.

The key store file is re-read when it changes (checked at most once a second), so keys
created or disabled with `aimesh apikey` take effect without a restart.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml

from aimesh.interceptors.base import InboundCall, Next

from ..units import parse_duration
from . import TenantIdentity, Unauthenticated
from .apikeys import PREFIX, KeyStore
from .jwt import JwtKey, JwtVerifier, load_keys

# Always open: load balancers' health checks and reflection (service discovery by tools).
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
)
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key"})
TENANT_PREFIX = "tenant:"
NEEDS_CREDENTIAL = (
    "this gateway needs a credential: send 'authorization: Bearer <API key or JWT>' "
    "(or 'x-api-key: <API key>') in the call's metadata"
)


# --- the key store file ----------------------------------------------------------------------


def load_store(path: str | Path, *, clock: Callable[[], float] = time.time) -> KeyStore:
    """A key store from its JSON or YAML file; a missing file is an empty store."""
    p = Path(path)
    if not p.exists():
        return KeyStore(clock=clock)
    try:
        data = yaml.safe_load(p.read_text()) or {"version": 1, "keys": {}}
        return KeyStore.from_dict(data, clock=clock)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{p}: {exc}") from None


def save_store(path: str | Path, store: KeyStore) -> None:
    """Writes the store atomically, readable by its owner only (it holds hashes, no keys)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(store.to_dict(), f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class StoreFile:
    """A key store kept in step with its file: re-read when the file's mtime or size
    changes, checked at most every `interval` seconds. A file that fails to load keeps the
    last good store (and says so on stderr)."""

    def __init__(self, path: str | Path, *, interval: float = 1.0) -> None:
        self.path = Path(path)
        self.interval = interval
        self._stamp = self._stat()
        self.store = load_store(self.path)
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def current(self) -> KeyStore:
        now = time.monotonic()
        if now - self._checked >= self.interval:
            self._checked = now
            stamp = self._stat()
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self.store = load_store(self.path)
                except (OSError, ValueError) as exc:
                    print(f"aimesh proxy: API key store not reloaded: {exc}", file=sys.stderr)
        return self.store


def load_jwt_keys(path: str | Path) -> list[JwtKey]:
    """JWT verification keys from a file: a JWKS (`{"keys": [...]}`), a JSON list of JWKs,
    or PEM public keys / certificates."""
    text = Path(path).read_text()
    if "-----BEGIN" in text:
        blocks = text.split("-----END")
        pems = [
            b[b.index("-----BEGIN") :] + "-----END" + blocks[i + 1].split("\n", 1)[0] + "\n"
            for i, b in enumerate(blocks[:-1])
            if "-----BEGIN" in b
        ]
        return [JwtKey.from_pem(p) for p in pems]
    data = json.loads(text)
    return load_keys(data)


# --- the policy -------------------------------------------------------------------------


def _token(call: InboundCall) -> str | None:
    for key, value in call.metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, rest = value.strip().partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                return rest.strip()
            raise Unauthenticated(
                "the authorization header must be 'Bearer <API key or JWT>' (the scheme "
                "Bearer, a space, then the credential)"
            )
    for key, value in call.metadata:
        if key == "x-api-key" and isinstance(value, str) and value.strip():
            return value.strip()
    return None


class CallerAuth:
    """The inbound policy (see the module docstring)."""

    def __init__(self, keys: StoreFile | KeyStore | None, jwt: JwtVerifier | None) -> None:
        if keys is None and jwt is None:
            raise ValueError("CallerAuth needs API keys, a JWT verifier, or both")
        self.keys = keys
        self.jwt = jwt

    def _store(self) -> KeyStore | None:
        return self.keys.current() if isinstance(self.keys, StoreFile) else self.keys

    def verify(self, token: str) -> TenantIdentity:
        """The tenant of a credential; raises Unauthenticated (never quoting it)."""
        if token.startswith(PREFIX):
            store = self._store()
            if store is None:
                raise Unauthenticated("this gateway does not accept API keys; send a JWT")
            return store.verify(token)
        if token.count(".") == 2:
            if self.jwt is None:
                raise Unauthenticated("this gateway does not accept JWTs; send an API key")
            return self.jwt.verify(token)
        accepted = " or ".join(
            what
            for what, on in (
                ("an aimesh API key (amk_...)", self.keys is not None),
                ("a JWT (header.payload.signature)", self.jwt is not None),
            )
            if on
        )
        raise Unauthenticated(f"unrecognized credential: expected {accepted}")

    async def around(self, call: InboundCall, call_next: Next) -> None:
        if call.method.startswith(OPEN_SERVICES):
            await call_next()
            return
        try:
            token = _token(call)
            if token is None:
                if call.identity.startswith("spiffe://"):  # a mesh workload, over mTLS
                    await call_next()
                    return
                raise Unauthenticated(NEEDS_CREDENTIAL)
            who = self.verify(token)
        except Unauthenticated as exc:
            await call.context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            return
        call.identity = TENANT_PREFIX + who.tenant
        call.facts.tenant = who.tenant
        call.drop_headers = CREDENTIAL_HEADERS  # the tenant's credential stays here
        await call_next()


# --- flags and the `aimesh apikey` commands ---------------------------------------------------


@dataclass(frozen=True)
class CallerFlags:
    api_keys: str | None = None
    jwt_keys: str | None = None
    jwt_issuer: Sequence[str] = ()
    jwt_audience: Sequence[str] = ()
    jwt_tenant_claim: str = "sub"


def add_proxy_flags(parser: Any) -> None:
    """The caller-credential flags of `aimesh proxy` (an argparse parser)."""
    group = parser.add_argument_group("callers at the gateway (docs/security.md)")
    group.add_argument(
        "--api-keys",
        default=None,
        metavar="FILE",
        help="require a credential: API keys from this store (aimesh apikey create)",
    )
    group.add_argument(
        "--jwt-keys",
        default=None,
        metavar="FILE",
        help="require a credential: JWTs signed by these keys (JWKS JSON or PEM)",
    )
    group.add_argument(
        "--jwt-issuer", action="append", default=[], metavar="ISS", help="accepted iss (repeat)"
    )
    group.add_argument(
        "--jwt-audience", action="append", default=[], metavar="AUD", help="required aud"
    )
    group.add_argument(
        "--jwt-tenant-claim", default="sub", metavar="CLAIM", help="claim naming the tenant"
    )


def flags_from_args(args: argparse.Namespace) -> CallerFlags:
    return CallerFlags(
        api_keys=args.api_keys,
        jwt_keys=args.jwt_keys,
        jwt_issuer=tuple(args.jwt_issuer),
        jwt_audience=tuple(args.jwt_audience),
        jwt_tenant_claim=args.jwt_tenant_claim,
    )


def caller_auth(flags: CallerFlags) -> CallerAuth | None:
    """The policy the flags ask for (None: no credential required); raises ValueError."""
    if flags.api_keys is None and flags.jwt_keys is None:
        if flags.jwt_issuer or flags.jwt_audience:
            raise ValueError("--jwt-issuer and --jwt-audience need --jwt-keys FILE")
        return None
    keys = StoreFile(flags.api_keys) if flags.api_keys else None
    jwt = None
    if flags.jwt_keys:
        try:
            loaded = load_jwt_keys(flags.jwt_keys)
        except OSError as exc:
            raise ValueError(f"--jwt-keys {flags.jwt_keys}: {exc.strerror}") from None
        except ValueError as exc:
            raise ValueError(f"--jwt-keys {flags.jwt_keys}: {exc}") from None
        jwt = JwtVerifier(
            loaded,
            issuer=flags.jwt_issuer or None,
            audience=flags.jwt_audience or None,
            tenant_claim=flags.jwt_tenant_claim,
        )
    return CallerAuth(keys, jwt)


def add_parsers(sub: Any) -> None:
    """`aimesh apikey create | list | disable`."""
    p = sub.add_parser(
        "apikey", help="API keys for callers at the gateway (aimesh proxy --api-keys)"
    )
    cmds = p.add_subparsers(dest="apikey_command", required=True)
    create = cmds.add_parser("create", help="create a key for a tenant; prints it once")
    create.add_argument("--store", required=True, metavar="FILE")
    create.add_argument("--tenant", required=True)
    create.add_argument("--expires", default=None, metavar="DURATION", help="e.g. 30d, 12h")
    lst = cmds.add_parser("list", help="the keys in a store (ids, tenants, state; no secrets)")
    lst.add_argument("--store", required=True, metavar="FILE")
    for name, what in (("disable", "disable a key"), ("enable", "enable a disabled key")):
        c = cmds.add_parser(name, help=what)
        c.add_argument("--store", required=True, metavar="FILE")
        c.add_argument("key_id", metavar="KEY_ID")


def _iso(t: float | None) -> str:
    if t is None:
        return "never"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lifetime(text: str) -> float:
    """'30d', '12h', '90m', '3600s' (or a number of seconds) -> seconds."""
    if text.endswith("d") and text[:-1].replace(".", "", 1).isdigit():
        return float(text[:-1]) * 86400
    return parse_duration(text)


def run(args: argparse.Namespace) -> int:
    try:
        store = load_store(args.store)
        if args.apikey_command == "create":
            expires = _lifetime(args.expires) if args.expires else None
            key, record = store.create(args.tenant, expires_in=expires)
            save_store(args.store, store)
            print(key)
            print(
                f"key {record.key_id} for tenant {record.tenant}, expires "
                f"{_iso(record.expires)}; shown once: only its hash is stored in {args.store}",
                file=sys.stderr,
            )
            return 0
        if args.apikey_command == "list":
            now = time.time()
            print(f"{'ID':<18}{'TENANT':<24}{'STATE':<10}{'CREATED':<22}EXPIRES")
            for r in sorted(store.records.values(), key=lambda r: r.created):
                state = (
                    "disabled"
                    if r.disabled
                    else "expired"
                    if r.expires is not None and r.expires <= now
                    else "active"
                )
                print(
                    f"{r.key_id:<18}{r.tenant:<24}{state:<10}{_iso(r.created):<22}{_iso(r.expires)}"
                )
            return 0
        record = store.disable(args.key_id, args.apikey_command == "disable")
        save_store(args.store, store)
        print(f"key {record.key_id} ({record.tenant}) {args.apikey_command}d")
        return 0
    except KeyError as exc:
        print(f"aimesh apikey: {exc.args[0]}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"aimesh apikey: {exc}", file=sys.stderr)
        return 2
