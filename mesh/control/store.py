"""Where the control plane keeps the mesh: the narrow interface, and the embedded store.

The gRPC services never touch storage directly. They call a `Store` to change things
(register, renew, deregister, put a config), and the store reports every change, its own
and other replicas', through `StoreEvents`; the control plane's catalog and config are
built only from those reports. So the same server runs on the embedded store (one
process; memory plus a SQLite file) and on etcd (several replicas; see etcd_store.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from aimesh.control.v1 import control_plane_pb2 as pb

from .catalog import Instance, Key
from .leases import LeaseTable

log = logging.getLogger("aimesh.control.store")


@dataclass(frozen=True, slots=True)
class ConfigRecord:
    version: int
    document: str
    source: str
    name: str  # metadata.name
    applied_at: float  # wall-clock seconds

    def to_proto(self) -> pb.ConfigVersion:
        msg = pb.ConfigVersion(
            version=self.version, document=self.document, source=self.source, name=self.name
        )
        msg.applied_at.FromNanoseconds(int(self.applied_at * 1e9))
        return msg


class Conflict(Exception):
    """A config put with an `expected_version` that is no longer the live one."""

    def __init__(self, expected: int, live: int) -> None:
        super().__init__(
            f"the live config is version {live}, not {expected}: someone applied a change "
            "first; get the live config, merge, and apply again"
        )
        self.expected = expected
        self.live = live


class StoreUnavailable(Exception):
    """The store cannot be reached (etcd down or partitioned); callers get UNAVAILABLE and
    retry, and the control plane keeps serving what it last knew."""


class StoreEvents(Protocol):
    def catalog_reset(self, version: int, instances: Iterable[Instance]) -> None: ...

    def catalog_changed(
        self, version: int, upserted: Iterable[Instance], removed: Iterable[Key]
    ) -> None: ...

    def config_changed(self, record: ConfigRecord) -> None: ...


class Store(Protocol):
    description: str  # for logs and the startup line, e.g. "sqlite /var/lib/aimesh/mesh.db"

    async def open(self, events: StoreEvents) -> None:
        """Loads what is stored, reports it (catalog_reset, config_changed), then keeps
        reporting changes until `close`."""
        ...

    async def close(self) -> None: ...

    async def register(self, instance: Instance, ttl: float) -> tuple[int, int]:
        """Adds or replaces an instance under a new lease; returns (lease id, version)."""
        ...

    async def keepalive(self, lease_id: int, serving: bool | None) -> float | None:
        """Renews a lease (and updates the instance's serving flag when given); returns
        the lease's ttl, or None when it is unknown or expired."""
        ...

    async def deregister(self, *, key: Key | None = None, lease_id: int = 0) -> int | None:
        """Removes an instance at once; returns the new version, or None if not found."""
        ...

    async def put_config(
        self, document: str, source: str, name: str, expected_version: int = 0
    ) -> ConfigRecord:
        """Stores a validated document as the live config; raises Conflict."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    service TEXT NOT NULL, instance_id TEXT NOT NULL, lease_id INTEGER NOT NULL,
    ttl REAL NOT NULL, data BLOB NOT NULL, PRIMARY KEY (service, instance_id));
CREATE TABLE IF NOT EXISTS configs (
    version INTEGER PRIMARY KEY, document TEXT NOT NULL, source TEXT NOT NULL,
    name TEXT NOT NULL, applied_at REAL NOT NULL);
"""

# Config versions kept on disk (the live one and its predecessors, for `aimesh get config
# --version`); older ones are pruned.
CONFIG_HISTORY = 50


class EmbeddedStore:
    """Memory, persisted to a SQLite file when `path` is given (else memory only).

    Every change is written before it is reported, in one transaction, so a restart
    finds exactly what watchers were last told. Leases are kept in memory and restored
    with a fresh ttl after a restart: instances that are still alive renew in time, the
    others expire as they would have.
    """

    def __init__(self, path: Path | None = None, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.description = f"sqlite {path}" if path else "memory (nothing persisted)"
        self._clock = clock
        # Lease ids start at a random base, not 1: after a restart of a memory store
        # (or on a fresh SQLite file), an instance renewing the lease it held before must
        # get found=false and register again, not renew another instance's new lease.
        # Below 2**53, so JSON and JavaScript clients read them exactly.
        self._leases = LeaseTable(clock, first_id=random.SystemRandom().randrange(1, 2**52))
        self._by_lease: dict[int, Key] = {}
        self._instances: dict[Key, Instance] = {}
        self._ttl: dict[Key, float] = {}
        self._version = 0
        self._catalog_version = 0
        self._config: ConfigRecord | None = None
        self._db: sqlite3.Connection | None = None
        self._events: StoreEvents | None = None
        self._wake = asyncio.Event()
        self.expired = 0  # instances removed because their lease ran out (for metrics)
        self._expiry: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self, events: StoreEvents) -> None:
        self._events = events
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._load(self._db)
        events.catalog_reset(self._catalog_version, self._instances.values())
        if self._config is not None:
            events.config_changed(self._config)
        self._expiry = asyncio.get_running_loop().create_task(self._expire_loop())

    def _load(self, db: sqlite3.Connection) -> None:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        # One counter numbers catalog and config changes alike (so versions never repeat);
        # the catalog resumes at the version of its own last change, so watchers that
        # saw it resume with increments, not a full snapshot.
        self._version = int(meta.get("version", 0))
        self._catalog_version = int(meta.get("catalog_version", 0))
        for service, instance_id, lease_id, ttl, data in db.execute(
            "SELECT service, instance_id, lease_id, ttl, data FROM instances"
        ):
            inst = Instance.from_proto(pb.Instance.FromString(data))
            key = (service, instance_id)
            self._instances[key] = inst
            self._ttl[key] = ttl
            self._leases.restore(lease_id, ttl)
            self._by_lease[lease_id] = key
        row = db.execute(
            "SELECT version, document, source, name, applied_at FROM configs "
            "ORDER BY version DESC LIMIT 1"
        ).fetchone()
        if row:
            self._config = ConfigRecord(*row)
            self._version = max(self._version, self._config.version)
        log.info(
            "loaded %d instances and config v%s from %s",
            len(self._instances),
            self._config.version if self._config else "-",
            self.path,
        )

    async def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- writes -------------------------------------------------------------------------

    def _next_version(self) -> int:
        self._version += 1
        return self._version

    def _persist(
        self, upserted: Iterable[Instance] = (), removed: Iterable[Key] = (), *, version: int
    ) -> None:
        if self._db is None:
            return
        db = self._db
        db.execute("BEGIN")
        try:
            for inst in upserted:
                db.execute(
                    "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?)",
                    (
                        inst.service,
                        inst.instance_id,
                        inst.lease_id,
                        self._ttl[inst.key],
                        inst.to_proto().SerializeToString(),
                    ),
                )
            for service, instance_id in removed:
                db.execute(
                    "DELETE FROM instances WHERE service=? AND instance_id=?",
                    (service, instance_id),
                )
            db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (version,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('catalog_version', ?)", (version,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _publish(self, version: int, upserted: list[Instance], removed: list[Key]) -> None:
        self._persist(upserted, removed, version=version)
        assert self._events is not None, "open() the store first"
        self._events.catalog_changed(version, upserted, removed)

    async def register(self, instance: Instance, ttl: float) -> tuple[int, int]:
        key = instance.key
        old = self._instances.get(key)
        if old is not None:  # a re-registration (say, after a restart) replaces the old lease
            self._leases.revoke(old.lease_id)
            self._by_lease.pop(old.lease_id, None)
        lease = self._leases.grant(ttl)
        inst = replace(instance, lease_id=lease.lease_id)
        self._instances[key] = inst
        self._ttl[key] = ttl
        self._by_lease[lease.lease_id] = key
        version = self._next_version()
        self._publish(version, [inst], [])
        self._wake.set()
        return lease.lease_id, version

    async def keepalive(self, lease_id: int, serving: bool | None) -> float | None:
        lease = self._leases.renew(lease_id)
        if lease is None:
            return None
        key = self._by_lease.get(lease_id)
        inst = self._instances.get(key) if key else None
        if inst is not None and serving is not None and inst.serving != serving:
            inst = replace(inst, serving=serving)
            self._instances[inst.key] = inst
            self._publish(self._next_version(), [inst], [])
        return lease.ttl

    async def deregister(self, *, key: Key | None = None, lease_id: int = 0) -> int | None:
        if key is None:
            key = self._by_lease.get(lease_id)
        inst = self._instances.get(key) if key else None
        if inst is None:
            return None
        self._drop([inst.key])
        return self._version

    def _drop(self, keys: list[Key]) -> None:
        for key in keys:
            inst = self._instances.pop(key)
            self._ttl.pop(key, None)
            self._leases.revoke(inst.lease_id)
            self._by_lease.pop(inst.lease_id, None)
        self._publish(self._next_version(), [], keys)

    async def put_config(
        self, document: str, source: str, name: str, expected_version: int = 0
    ) -> ConfigRecord:
        live = self._config.version if self._config else 0
        if expected_version and expected_version != live:
            raise Conflict(expected_version, live)
        record = ConfigRecord(self._next_version(), document, source, name, time.time())
        if self._db is not None:
            db = self._db
            db.execute("BEGIN")
            db.execute(
                "INSERT INTO configs VALUES (?, ?, ?, ?, ?)",
                (record.version, document, source, name, record.applied_at),
            )
            db.execute(
                "DELETE FROM configs WHERE version NOT IN "
                "(SELECT version FROM configs ORDER BY version DESC LIMIT ?)",
                (CONFIG_HISTORY,),
            )
            db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (record.version,))
            db.execute("COMMIT")
        self._config = record
        assert self._events is not None
        self._events.config_changed(record)
        return record

    # -- expiry -------------------------------------------------------------------------

    async def _expire_loop(self) -> None:
        while True:
            at = self._leases.next_expiry()
            self._wake.clear()
            if at is None:
                await self._wake.wait()
                continue
            delay = at - self._clock()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            expired = self._leases.expired()
            keys = [self._by_lease[lid] for lid in expired if lid in self._by_lease]
            if keys:
                log.info("lease expired: %s", ", ".join(f"{s}/{i}" for s, i in keys))
                for lid in expired:
                    self._by_lease.pop(lid, None)
                self._drop(keys)
                self.expired += len(keys)
