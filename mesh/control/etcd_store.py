"""The control plane's store on etcd: several control-plane replicas share one mesh.

Layout, under `prefix` (default /aimesh/v1/):

    instances/<service>/<instance_id>   pb.Instance, the key attached to the instance's lease
    config                              pb.ConfigVersion, the live config (version left 0)
    config-history/<revision:020d>      the last CONFIG_HISTORY configs, version filled in

Versions are etcd revisions. A catalog change is numbered with the revision that made it
(the key's mod_revision; for a delete, the revision of the delete), the config's version is
its key's mod_revision, and the writes return the revision of their own write. So every
replica gives the same version to the same change, and a watcher can move between
replicas without a full resync. Revisions also count other keys, so versions have gaps;
the catalog allows for that.

Each replica watches the whole prefix and reports what it sees through `StoreEvents`, its
own writes included: a write returns once etcd has accepted it, and its change comes back
through the watch (the gRPC layer waits for that, `ControlPlane.wait_catalog`). The events
of one revision are reported as one `catalog_changed`.

Leases are etcd's: `register` grants a lease with the instance's ttl (rounded up to whole
seconds, at least 1) and puts the instance under it; `keepalive` refreshes it on whichever
replica the instance reaches; when the holder stops renewing, etcd deletes the key, and
the DELETE event removes the instance on every replica.

etcd going away never takes the control plane down. `open` waits up to `open_timeout` for
etcd to answer and then raises `StoreUnavailable`; after that, a broken watch (etcd
restarted, connection lost, history compacted, leader lost) is retried with backoff, on
the first endpoint that answers, and followed by a full read reported as `catalog_reset`.
Meanwhile the control plane serves what it last knew, and writes raise `StoreUnavailable`
(the gRPC layer answers UNAVAILABLE; clients retry).

The client is aetcd: maintained (1.0, 2026), asyncio on grpc.aio like the rest of aimesh,
with stubs generated from etcd's own protos. python-etcd3, the usual choice, has been
unmaintained since 2020 and is thread-based (grpc sync). aetcd's wrappers are used where
they keep what we need (get, put, lease grant, revoke and lookup); for transactions, the
watch and renewals we call its generated stubs on its channel directly: its
`transaction()` drops the response header (so the revision of the write), its watcher
hands out events one at a time (so the events of one revision could not be reported
together), and its `refresh_lease` leaves a stream open for the garbage collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any

import aetcd
import grpc
import grpc.aio
from aetcd import rpc
from google.protobuf.message import DecodeError

from aimesh.control.v1 import control_plane_pb2 as pb

from .catalog import Instance, Key
from .store import CONFIG_HISTORY, ConfigRecord, Conflict, StoreEvents, StoreUnavailable

__all__ = ["EtcdStore", "StoreUnavailable", "parse_endpoints"]

log = logging.getLogger("aimesh.control.etcd")

DEFAULT_ENDPOINTS = "127.0.0.1:2379"
DEFAULT_PREFIX = "/aimesh/v1/"

# Reconnect quickly after an etcd restart, notice a dead peer (a half-open connection on
# an idle watch) within ~15 s, never go through an http_proxy from the environment, and
# accept a large catalog in one read.
CHANNEL_OPTIONS: dict[str, Any] = {
    "grpc.initial_reconnect_backoff_ms": 200,
    "grpc.max_reconnect_backoff_ms": 2_000,
    "grpc.keepalive_time_ms": 10_000,  # etcd rejects pings more often than every 5 s
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.enable_http_proxy": 0,
    "grpc.max_receive_message_length": 256 * 1024 * 1024,
}

# Backoff between attempts to reach etcd again (seconds; doubled each time, with jitter).
RETRY_MIN = 0.2
RETRY_MAX = 5.0

# Failures of a call to etcd: its own errors, the channel's, and aetcd's wrapping of them.
_FAILURES: tuple[type[BaseException], ...] = (
    grpc.aio.AioRpcError,
    grpc.aio.UsageError,
    aetcd.ClientError,
    TimeoutError,
    OSError,
)


class _NotFound(Exception):
    """etcd answered NOT_FOUND: a lease that expired or never existed."""


class _WatchBroken(Exception):
    """etcd ended or refused the watch."""


_WATCH_FAILURES: tuple[type[BaseException], ...] = (_WatchBroken, StoreUnavailable, *_FAILURES)


def parse_endpoints(endpoints: str) -> list[tuple[str, int]]:
    """'HOST:PORT[,HOST:PORT...]' (an http:// in front is allowed) -> [(host, port)]."""
    out: list[tuple[str, int]] = []
    for raw in endpoints.split(","):
        item = raw.strip().rstrip("/")
        if item.startswith("https://"):
            raise ValueError(f"etcd endpoint {item!r}: TLS to etcd is not supported")
        item = item.removeprefix("http://")
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"etcd endpoint {item!r}: expected HOST:PORT, e.g. 127.0.0.1:2379")
        out.append((host, int(port)))
    if not out:
        raise ValueError("etcd endpoints: none given; expected HOST:PORT[,HOST:PORT...]")
    return out


def _prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes [prefix, end) every key starting with `prefix`."""
    end = bytearray(prefix)
    for i in reversed(range(len(end))):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"  # all keys


def _status(exc: BaseException) -> grpc.StatusCode | None:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code()
    if isinstance(exc.__cause__, grpc.aio.AioRpcError):  # aetcd wraps the gRPC error
        return exc.__cause__.code()
    return None


def _detail(exc: BaseException) -> str:
    err = exc if isinstance(exc, grpc.aio.AioRpcError) else exc.__cause__
    if isinstance(err, grpc.aio.AioRpcError):
        return f"{err.code().name}: {err.details()}"
    return str(exc) or type(exc).__name__


def _encode_instance(inst: Instance) -> bytes:
    return inst.to_proto().SerializeToString()


async def _close_quietly(client: Any) -> None:
    try:
        await client.close()
    except Exception as exc:  # a channel that is already broken
        log.debug("closing an etcd client: %s", exc)


class EtcdStore:
    """The `Store` on etcd v3 (3.4 or later)."""

    def __init__(
        self,
        endpoints: str = DEFAULT_ENDPOINTS,
        prefix: str = DEFAULT_PREFIX,
        *,
        timeout: float = 5.0,
        open_timeout: float = 30.0,
    ) -> None:
        self._endpoints = parse_endpoints(endpoints)
        if not prefix.endswith("/"):
            prefix += "/"
        self.prefix = prefix
        self.description = f"etcd {endpoints} (prefix {prefix})"
        self._timeout = timeout  # per call to etcd
        self._open_timeout = open_timeout
        self._prefix = prefix.encode()
        self._instances_prefix = f"{prefix}instances/".encode()
        self._config_key = f"{prefix}config".encode()
        self._history_prefix = f"{prefix}config-history/".encode()

        self._client: Any = None  # aetcd.Client
        self._endpoint = "-"  # the one `_client` talks to
        self._connect_lock = asyncio.Lock()
        self._events: StoreEvents | None = None
        self._watch_task: asyncio.Task[None] | None = None
        # What the watch has reported, for keepalive (which instance a lease holds, and
        # whether its serving flag changes) and deregister by lease.
        self._instances: dict[Key, Instance] = {}
        self._lease_of: dict[Key, int] = {}
        self._by_lease: dict[int, Key] = {}
        self._config_version = 0
        self._closed = False

    # -- keys -----------------------------------------------------------------------------

    def _instance_key(self, key: Key) -> bytes:
        return self._instances_prefix + f"{key[0]}/{key[1]}".encode()

    def _parse_instance_key(self, raw: bytes) -> Key | None:
        if not raw.startswith(self._instances_prefix):
            return None
        try:
            rest = raw[len(self._instances_prefix) :].decode()
        except UnicodeDecodeError:
            return None
        service, sep, instance_id = rest.partition("/")  # a service is a DNS label: no '/'
        return (service, instance_id) if sep and service and instance_id else None

    def _decode_instance(self, key: Key, value: bytes) -> Instance | None:
        try:
            inst = Instance.from_proto(pb.Instance.FromString(value))
        except (DecodeError, ValueError) as exc:
            log.warning("ignoring %s/%s in etcd: not a valid instance (%s)", *key, exc)
            return None
        if inst.key != key:
            log.warning("ignoring %s/%s in etcd: it holds instance %s/%s", *key, *inst.key)
            return None
        return inst

    def _decode_config(self, kv: Any) -> ConfigRecord | None:
        try:
            msg = pb.ConfigVersion.FromString(kv.value)
        except DecodeError as exc:
            log.error("ignoring the config in etcd: not a ConfigVersion (%s)", exc)
            return None
        return ConfigRecord(
            version=kv.mod_revision,
            document=msg.document,
            source=msg.source,
            name=msg.name,
            applied_at=msg.applied_at.ToNanoseconds() / 1e9,
        )

    # -- connection -----------------------------------------------------------------------

    async def _rpc(self, what: str, call: Awaitable[Any]) -> Any:
        """Awaits a call to etcd: NOT_FOUND becomes _NotFound, any other failure
        StoreUnavailable."""
        try:
            return await call
        except _FAILURES as exc:
            if _status(exc) == grpc.StatusCode.NOT_FOUND:
                raise _NotFound(_detail(exc)) from exc
            raise StoreUnavailable(
                f"etcd at {self._endpoint}: {what} failed ({_detail(exc)})"
            ) from exc

    async def _txn(self, client: Any, what: str, request: Any) -> Any:
        return await self._rpc(
            what, client.kvstub.Txn(request, timeout=self._timeout, metadata=client.metadata)
        )

    async def _get_client(self) -> Any:
        if self._client is not None:
            return self._client
        if self._closed:
            raise StoreUnavailable("the etcd store is closed")
        async with self._connect_lock:
            if self._client is not None:
                return self._client
            return await self._connect_locked()

    async def _reconnect(self) -> Any:
        """Keeps the current client if etcd answers on it, else connects anew."""
        async with self._connect_lock:
            if self._client is not None and await self._probe(self._client) is None:
                return self._client
            return await self._connect_locked()

    async def _probe(self, client: Any) -> str | None:
        """None when etcd answers a linearizable read (so it also has a leader), else
        what went wrong."""
        request = rpc.RangeRequest(key=self._config_key, count_only=True)
        try:
            await client.connect()
            await client.kvstub.Range(request, timeout=self._timeout, metadata=client.metadata)
        except _FAILURES as exc:
            return _detail(exc)
        return None

    async def _connect_locked(self) -> Any:
        failures: list[str] = []
        for host, port in self._endpoints:
            client = aetcd.Client(
                host=host, port=port, timeout=self._timeout, options=CHANNEL_OPTIONS
            )
            error = await self._probe(client)
            if error is not None:
                failures.append(f"{host}:{port} ({error})")
                await _close_quietly(client)
                continue
            old, self._client = self._client, client
            self._endpoint = f"{host}:{port}"
            if old is not None:
                await _close_quietly(old)
            log.info("connected to etcd at %s", self._endpoint)
            return client
        raise StoreUnavailable("etcd is unreachable: " + "; ".join(failures))

    async def _revoke_quietly(self, client: Any, lease_id: int) -> None:
        """Revokes a lease that holds no instance any more; if that fails, it expires."""
        try:
            await self._rpc("revoking a lease", client.revoke_lease(lease_id))
        except (_NotFound, StoreUnavailable) as exc:
            log.debug("lease %x not revoked: %s", lease_id, exc)

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self, events: StoreEvents) -> None:
        if self._watch_task is not None:
            raise RuntimeError("the store is already open")
        self._events = events
        self._closed = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._open_timeout
        delay = RETRY_MIN
        while True:
            try:
                await self._reconnect()
                revision = await self._load()
                break
            except StoreUnavailable as exc:
                if loop.time() + delay >= deadline:
                    raise StoreUnavailable(
                        f"{exc} (tried for {self._open_timeout:g}s). Is etcd running? "
                        "`make etcd` runs one on 127.0.0.1:2379"
                    ) from None
                log.warning("%s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        self._watch_task = loop.create_task(
            self._watch_loop(revision), name=f"etcd watch {self.prefix}"
        )

    async def close(self) -> None:
        self._closed = True
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is not None:
            await _close_quietly(client)

    async def _load(self) -> int:
        """Reads the instances and the config (in one transaction, so at one revision),
        reports them, and returns that revision."""
        client = await self._get_client()
        request = rpc.TxnRequest(
            success=[
                rpc.RequestOp(
                    request_range=rpc.RangeRequest(
                        key=self._instances_prefix, range_end=_prefix_end(self._instances_prefix)
                    )
                ),
                rpc.RequestOp(request_range=rpc.RangeRequest(key=self._config_key)),
            ]
        )
        resp = await self._txn(client, "reading the catalog", request)
        revision: int = resp.header.revision
        instances: dict[Key, Instance] = {}
        leases: dict[Key, int] = {}
        for kv in resp.responses[0].response_range.kvs:
            key = self._parse_instance_key(kv.key)
            inst = self._decode_instance(key, kv.value) if key else None
            if key and inst:
                instances[key] = inst
                leases[key] = kv.lease
        config_kvs = resp.responses[1].response_range.kvs
        config = self._decode_config(config_kvs[0]) if config_kvs else None

        self._instances = instances
        self._lease_of = leases
        self._by_lease = {lease: key for key, lease in leases.items()}
        log.info(
            "etcd %s: %d instances, config v%s, at revision %d",
            self._endpoint,
            len(instances),
            config.version if config else "-",
            revision,
        )
        events = self._events
        assert events is not None
        self._report(events.catalog_reset, revision, list(instances.values()))
        if config is not None and config.version != self._config_version:
            self._config_version = config.version
            self._report(events.config_changed, config)
        return revision

    # -- the watch ------------------------------------------------------------------------

    async def _watch_loop(self, revision: int) -> None:
        loop = asyncio.get_running_loop()
        delay = RETRY_MIN
        while True:
            started = loop.time()
            try:
                await self._watch(revision)
            except _WATCH_FAILURES as exc:
                log.warning(
                    "etcd watch on %s (%s) broke: %s; resyncing",
                    self._endpoint,
                    self.prefix,
                    _detail(exc),
                )
            except Exception:
                log.exception("etcd watch on %s failed; resyncing", self._endpoint)
            if loop.time() - started > 30:
                delay = RETRY_MIN  # it had worked for a while: this is a new outage
            while True:
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, RETRY_MAX)
                try:
                    await self._reconnect()
                    revision = await self._load()
                except (StoreUnavailable, _NotFound) as exc:
                    log.warning("%s; retrying in about %.1fs", exc, delay)
                    continue
                except Exception:  # never let the watch die: retry as for an outage
                    log.exception("resyncing from etcd failed; retrying in about %.1fs", delay)
                    continue
                log.info("etcd watch resynced at revision %d (catalog reset)", revision)
                break

    async def _watch(self, revision: int) -> None:
        """Streams the changes after `revision` into the events; returns only by raising."""
        client = await self._get_client()
        # hasleader: etcd cancels the watch when its member loses the leader, instead of
        # leaving it silent while the rest of the cluster moves on.
        metadata = (*(client.metadata or ()), ("hasleader", "true"))
        call = rpc.WatchStub(client.channel).Watch(metadata=metadata)
        try:
            await call.write(
                rpc.WatchRequest(
                    create_request=rpc.WatchCreateRequest(
                        key=self._prefix,
                        range_end=_prefix_end(self._prefix),
                        start_revision=revision + 1,
                    )
                )
            )
            while True:
                resp = await call.read()
                if not isinstance(resp, rpc.WatchResponse):  # grpc.aio.EOF
                    raise _WatchBroken("etcd ended the watch stream")
                if resp.compact_revision:
                    raise _WatchBroken(
                        f"revision {revision + 1} is compacted (history starts at "
                        f"{resp.compact_revision})"
                    )
                if resp.canceled:
                    raise _WatchBroken(f"etcd canceled it: {resp.cancel_reason or '-'}")
                if resp.created:
                    log.debug("etcd watch on %s from revision %d", self.prefix, revision + 1)
                if resp.events:
                    self._deliver(resp.events)
                    revision = resp.events[-1].kv.mod_revision
        finally:
            call.cancel()

    def _deliver(self, events: Any) -> None:
        group: list[Any] = []
        for ev in events:
            if group and ev.kv.mod_revision != group[0].kv.mod_revision:
                self._apply(group)
                group = []
            group.append(ev)
        if group:
            self._apply(group)

    def _apply(self, group: list[Any]) -> None:
        """Reports the events of one revision."""
        revision: int = group[0].kv.mod_revision
        upserted: dict[Key, Instance] = {}
        removed: dict[Key, None] = {}
        config: ConfigRecord | None = None
        for ev in group:
            kv = ev.kv
            if kv.key == self._config_key:
                if ev.type == rpc.Event.PUT:
                    config = self._decode_config(kv)
                else:
                    log.warning("the config was deleted from etcd; keeping the live one")
                continue
            key = self._parse_instance_key(kv.key)
            if key is None:
                continue  # config history, or not ours
            old_lease = self._lease_of.pop(key, None)
            if old_lease is not None and self._by_lease.get(old_lease) == key:
                del self._by_lease[old_lease]
            if ev.type == rpc.Event.PUT:
                inst = self._decode_instance(key, kv.value)
                if inst is not None:
                    self._instances[key] = inst
                    self._lease_of[key] = kv.lease
                    self._by_lease[kv.lease] = key
                    upserted[key] = inst
                    removed.pop(key, None)
                    continue
            self._instances.pop(key, None)
            upserted.pop(key, None)
            removed[key] = None
        events = self._events
        assert events is not None
        if upserted or removed:
            self._report(events.catalog_changed, revision, list(upserted.values()), list(removed))
        if config is not None:
            self._config_version = config.version
            self._report(events.config_changed, config)

    @staticmethod
    def _report(fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # the control plane's bug; the watch must go on
            log.exception("reporting a change from etcd failed")

    # -- writes ---------------------------------------------------------------------------

    async def register(self, instance: Instance, ttl: float) -> tuple[int, int]:
        client = await self._get_client()
        lease = await self._rpc("granting a lease", client.lease(max(1, math.ceil(ttl))))
        lease_id: int = lease.id
        inst = replace(instance, lease_id=lease_id)
        try:
            put = await self._rpc(
                "registering an instance",
                client.put(
                    self._instance_key(inst.key),
                    _encode_instance(inst),
                    lease=lease_id,
                    prev_kv=True,
                ),
            )
        except BaseException:
            await self._revoke_quietly(client, lease_id)
            raise
        # A re-registration: the put has moved the key to the new lease, so revoking the
        # old one deletes nothing (watchers see one replacement, not a removal and an add).
        old = put.prev_kv
        if old is not None and old.lease and old.lease != lease_id:
            await self._revoke_quietly(client, old.lease)
        return lease_id, int(put.header.revision)

    async def keepalive(self, lease_id: int, serving: bool | None) -> float | None:
        client = await self._get_client()
        try:
            reply = await self._rpc("renewing a lease", self._refresh(client, lease_id))
        except _NotFound:
            return None
        if not isinstance(reply, rpc.LeaseKeepAliveResponse) or reply.TTL <= 0:
            return None  # TTL 0: etcd does not know the lease (expired, or never granted)
        if serving is not None:
            await self._set_serving(client, lease_id, serving)
        return float(reply.TTL)

    async def _refresh(self, client: Any, lease_id: int) -> Any:
        """One renewal on a LeaseKeepAlive stream of its own, closed right after (aetcd's
        refresh_lease leaves the stream to the garbage collector)."""
        call = client.leasestub.LeaseKeepAlive(
            iter([rpc.LeaseKeepAliveRequest(ID=lease_id)]),
            timeout=self._timeout,
            metadata=client.metadata,
        )
        try:
            return await call.read()  # a LeaseKeepAliveResponse, or grpc.aio.EOF
        finally:
            call.cancel()

    async def _key_of_lease(self, client: Any, lease_id: int) -> Key | None:
        """The instance a lease holds, as etcd says (the lease may be another replica's,
        not yet seen here)."""
        try:
            info = await self._rpc("looking up a lease", client.get_lease_info(lease_id, keys=True))
        except _NotFound:
            return None
        if info.TTL < 0:
            return None
        for raw in info.keys:
            key = self._parse_instance_key(raw)
            if key is not None:
                return key
        return None

    async def _set_serving(self, client: Any, lease_id: int, serving: bool) -> None:
        key = self._by_lease.get(lease_id)
        seen = self._instances.get(key) if key else None
        if seen is not None and seen.serving == serving:
            return  # the common case: no change, no extra call
        if key is None:
            key = await self._key_of_lease(client, lease_id)
            if key is None:
                return
        raw = self._instance_key(key)
        for _ in range(5):
            got = await self._rpc("reading an instance", client.get(raw))
            if got is None or got.lease != lease_id:
                return  # gone, or re-registered under another lease
            current = self._decode_instance(key, got.value)
            if current is None or current.serving == serving:
                return
            request = rpc.TxnRequest(
                compare=[
                    rpc.Compare(
                        key=raw,
                        target=rpc.Compare.MOD,
                        result=rpc.Compare.EQUAL,
                        mod_revision=got.mod_revision,
                    )
                ],
                success=[
                    rpc.RequestOp(
                        request_put=rpc.PutRequest(
                            key=raw,
                            value=_encode_instance(replace(current, serving=serving)),
                            lease=lease_id,
                        )
                    )
                ],
            )
            try:
                resp = await self._txn(client, "updating an instance", request)
            except _NotFound:
                return  # the lease expired meanwhile
            if resp.succeeded:
                return
        log.warning("%s/%s: serving flag not updated, the instance kept changing", *key)

    async def deregister(self, *, key: Key | None = None, lease_id: int = 0) -> int | None:
        client = await self._get_client()
        compare = []
        if key is None:
            if not lease_id:
                return None
            key = self._by_lease.get(lease_id) or await self._key_of_lease(client, lease_id)
            if key is None:
                return None
            raw = self._instance_key(key)
            # Only if the key is still this lease's (not re-registered meanwhile).
            compare.append(
                rpc.Compare(
                    key=raw, target=rpc.Compare.LEASE, result=rpc.Compare.EQUAL, lease=lease_id
                )
            )
        raw = self._instance_key(key)
        request = rpc.TxnRequest(
            compare=compare,
            success=[
                rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=raw, prev_kv=True))
            ],
        )
        resp = await self._txn(client, "deregistering an instance", request)
        if not resp.succeeded:
            return None
        deleted = resp.responses[0].response_delete_range
        if not deleted.deleted:
            return None
        if deleted.prev_kvs and deleted.prev_kvs[0].lease:
            await self._revoke_quietly(client, deleted.prev_kvs[0].lease)
        return int(resp.header.revision)

    async def put_config(
        self, document: str, source: str, name: str, expected_version: int = 0
    ) -> ConfigRecord:
        client = await self._get_client()
        applied_ns = time.time_ns()
        msg = pb.ConfigVersion(document=document, source=source, name=name)
        msg.applied_at.FromNanoseconds(applied_ns)
        compare = []
        if expected_version:
            # The live config's version is its key's mod_revision; 0 when there is none.
            compare.append(
                rpc.Compare(
                    key=self._config_key,
                    target=rpc.Compare.MOD,
                    result=rpc.Compare.EQUAL,
                    mod_revision=expected_version,
                )
            )
        request = rpc.TxnRequest(
            compare=compare,
            success=[
                rpc.RequestOp(
                    request_put=rpc.PutRequest(key=self._config_key, value=msg.SerializeToString())
                )
            ],
            failure=[rpc.RequestOp(request_range=rpc.RangeRequest(key=self._config_key))],
        )
        resp = await self._txn(client, "storing the config", request)
        if not resp.succeeded:
            kvs = resp.responses[0].response_range.kvs
            raise Conflict(expected_version, kvs[0].mod_revision if kvs else 0)
        version = int(resp.header.revision)
        msg.version = version
        await self._keep_history(client, version, msg)
        return ConfigRecord(version, document, source, name, applied_ns / 1e9)

    async def _keep_history(self, client: Any, version: int, msg: pb.ConfigVersion) -> None:
        """Adds a config to the history and prunes it to CONFIG_HISTORY versions; best
        effort (the config itself is stored already)."""
        prefix = self._history_prefix
        try:
            await self._rpc(
                "storing config history",
                client.put(prefix + f"{version:020d}".encode(), msg.SerializeToString()),
            )
            kept = await self._rpc(
                "listing config history",
                client.kvstub.Range(
                    rpc.RangeRequest(key=prefix, range_end=_prefix_end(prefix), keys_only=True),
                    timeout=self._timeout,
                    metadata=client.metadata,
                ),
            )
            keys = [kv.key for kv in kept.kvs]  # ascending, so oldest first
            if len(keys) > CONFIG_HISTORY:
                await self._rpc(
                    "pruning config history",
                    client.kvstub.DeleteRange(
                        rpc.DeleteRangeRequest(key=prefix, range_end=keys[-CONFIG_HISTORY]),
                        timeout=self._timeout,
                        metadata=client.metadata,
                    ),
                )
        except (StoreUnavailable, _NotFound) as exc:
            log.warning("config v%d stored, but not its history entry: %s", version, exc)
