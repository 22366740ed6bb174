"""EtcdStore against a real etcd: a throwaway one for the session (Debian's etcd-server,
installed by scripts/install-etcd.sh when missing), and its own one for the restart test.

Every test uses its own key prefix, so they share the etcd without seeing each other.
Nothing sleeps: tests wait, with a timeout, for the store to report what they expect.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import pytest

from aimesh.mesh.control import etcd_store
from aimesh.mesh.control.catalog import Instance, Key
from aimesh.mesh.control.etcd_server import EtcdServer, free_port
from aimesh.mesh.control.etcd_store import EtcdStore, parse_endpoints
from aimesh.mesh.control.store import ConfigRecord, Conflict, StoreUnavailable

ROOT = Path(__file__).resolve().parent.parent
WAIT = 5.0  # for anything the watch reports

T = TypeVar("T")
Change = tuple[int, list[Instance], list[Key]]


class Recorder:
    """StoreEvents that keeps every report and wakes the waiters on each."""

    def __init__(self) -> None:
        self.resets: list[tuple[int, dict[Key, Instance]]] = []
        self.changes: list[Change] = []
        self.configs: list[ConfigRecord] = []
        self.catalog: dict[Key, Instance] = {}
        self.version = 0
        self.errors: list[str] = []
        self._wake = asyncio.Event()

    def catalog_reset(self, version: int, instances: Iterable[Instance]) -> None:
        items = {i.key: i for i in instances}
        self.resets.append((version, items))
        self.catalog, self.version = dict(items), version
        self._wake.set()

    def catalog_changed(
        self, version: int, upserted: Iterable[Instance], removed: Iterable[Key]
    ) -> None:
        ups, gone = list(upserted), list(removed)
        if version <= self.version:
            self.errors.append(f"version {version} after {self.version}")
        self.changes.append((version, ups, gone))
        for inst in ups:
            self.catalog[inst.key] = inst
        for key in gone:
            self.catalog.pop(key, None)
        self.version = version
        self._wake.set()

    def config_changed(self, record: ConfigRecord) -> None:
        self.configs.append(record)
        self._wake.set()

    async def wait_for(self, found: Callable[[], T | None], timeout: float = WAIT) -> T:
        """What `found` returns once it is truthy; TimeoutError after `timeout`."""
        async with asyncio.timeout(timeout):
            while True:
                result = found()
                if result:
                    return result
                self._wake.clear()
                await self._wake.wait()

    async def change_at(self, version: int) -> Change:
        return await self.wait_for(lambda: next((c for c in self.changes if c[0] == version), None))

    async def change_after(self, version: int) -> Change:
        return await self.wait_for(lambda: next((c for c in self.changes if c[0] > version), None))

    async def config_at(self, version: int) -> ConfigRecord:
        return await self.wait_for(
            lambda: next((c for c in self.configs if c.version == version), None)
        )


def instance(n: int, service: str = "llm", **changes: Any) -> Instance:
    inst = Instance(
        service=service,
        instance_id=f"i{n}",
        address=f"10.0.0.{n}:50051",
        models=("gpt-4",),
        zone="a",
        labels={"tier": "gold"},
        registered_at=1_700_000_000.5,
    )
    return replace(inst, **changes)


@pytest.fixture
def prefix() -> str:
    return f"/aimesh-test/{uuid.uuid4().hex[:12]}/"


StoreFactory = Callable[[], Awaitable[tuple[EtcdStore, Recorder]]]


@pytest.fixture
async def make_store(etcd: EtcdServer, prefix: str) -> AsyncIterator[StoreFactory]:
    """Opens replicas: stores on the session's etcd, all on this test's prefix."""
    opened: list[EtcdStore] = []

    async def _make() -> tuple[EtcdStore, Recorder]:
        store, rec = EtcdStore(etcd.endpoint, prefix, timeout=2.0), Recorder()
        opened.append(store)
        await store.open(rec)
        return store, rec

    yield _make
    for store in opened:
        await store.close()


@pytest.fixture
async def raw(etcd: EtcdServer) -> AsyncIterator[Any]:
    """A plain etcd client, to look at what the store wrote."""
    host, port = parse_endpoints(etcd.endpoint)[0]
    async with aetcd.Client(host=host, port=port, timeout=5) as client:
        yield client


# -- one replica --------------------------------------------------------------------------


async def test_register_reports_the_instance_at_the_put_revision(
    make_store: StoreFactory, raw: Any, prefix: str
) -> None:
    store, rec = await make_store()
    assert rec.resets == [(rec.resets[0][0], {})]
    assert store.description.startswith("etcd 127.0.0.1:")

    lease_id, version = await store.register(instance(1), ttl=5)

    assert lease_id > 0
    expected = instance(1, lease_id=lease_id)
    assert await rec.change_at(version) == (version, [expected], [])
    got = await raw.get(f"{prefix}instances/llm/i1".encode())
    assert got.mod_revision == version and got.lease == lease_id
    assert rec.catalog == {expected.key: expected}
    assert rec.errors == []


async def test_keepalive_renews_and_updates_serving(make_store: StoreFactory) -> None:
    store, rec = await make_store()
    lease_id, version = await store.register(instance(1), ttl=3)
    await rec.change_at(version)

    assert await store.keepalive(lease_id, None) == 3.0
    assert await store.keepalive(lease_id, True) == 3.0  # unchanged: no event
    assert await store.keepalive(lease_id, False) == 3.0
    v, ups, gone = await rec.change_after(version)
    assert ups == [instance(1, lease_id=lease_id, serving=False)] and gone == []
    assert await store.keepalive(lease_id, False) == 3.0  # unchanged again

    # A barrier: the next change is this one, so the keepalives above made no other.
    _, barrier = await store.register(instance(2), ttl=3)
    await rec.change_at(barrier)
    assert [c[0] for c in rec.changes] == [version, v, barrier]

    assert await store.keepalive(0x7EADBEEF, None) is None
    assert await store.keepalive(0x7EADBEEF, False) is None


async def test_reregistering_replaces_the_lease_without_a_removal(
    make_store: StoreFactory,
) -> None:
    store, rec = await make_store()
    old_lease, v1 = await store.register(instance(1), ttl=5)
    new_lease, v2 = await store.register(instance(1, address="10.0.0.9:50051"), ttl=5)

    assert new_lease != old_lease and v2 > v1
    assert await rec.change_at(v2) == (
        v2,
        [instance(1, address="10.0.0.9:50051", lease_id=new_lease)],
        [],
    )
    assert all(not c[2] for c in rec.changes)
    assert await store.keepalive(old_lease, None) is None  # revoked
    assert await store.keepalive(new_lease, None) == 5.0


async def test_deregister_by_key_and_by_lease(make_store: StoreFactory) -> None:
    store, rec = await make_store()
    lease1, _ = await store.register(instance(1), ttl=5)
    lease2, v = await store.register(instance(2), ttl=5)
    await rec.change_at(v)

    v1 = await store.deregister(key=("llm", "i1"))
    assert v1 is not None
    assert await rec.change_at(v1) == (v1, [], [("llm", "i1")])
    assert await store.deregister(key=("llm", "i1")) is None
    assert await store.keepalive(lease1, None) is None  # its lease went with it

    v2 = await store.deregister(lease_id=lease2)
    assert v2 is not None and v2 > v1
    assert await rec.change_at(v2) == (v2, [], [("llm", "i2")])
    assert await store.deregister(lease_id=lease2) is None
    assert await store.deregister(lease_id=0) is None
    assert rec.catalog == {}


async def test_an_expired_lease_removes_the_instance(make_store: StoreFactory) -> None:
    store, rec = await make_store()
    lease_id, version = await store.register(instance(1), ttl=1)
    await rec.change_at(version)

    _, _, gone = await rec.change_after(version)  # etcd's DELETE, ~1 s later

    assert gone == [("llm", "i1")]
    assert rec.catalog == {}
    assert await store.keepalive(lease_id, None) is None


async def test_put_config_checks_the_expected_version(
    make_store: StoreFactory, raw: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(etcd_store, "CONFIG_HISTORY", 3)
    store, rec = await make_store()
    assert rec.configs == []

    with pytest.raises(Conflict) as none_yet:
        await store.put_config("doc0", "mesh.yaml", "demo", expected_version=7)
    assert (none_yet.value.expected, none_yet.value.live) == (7, 0)

    first = await store.put_config("doc1", "mesh.yaml", "demo")
    assert await rec.config_at(first.version) == first
    got = await raw.get(f"{prefix}config".encode())
    assert got.mod_revision == first.version

    second = await store.put_config("doc2", "mesh.yaml", "demo", expected_version=first.version)
    assert second.version > first.version
    assert await rec.config_at(second.version) == second

    with pytest.raises(Conflict) as stale:
        await store.put_config("doc3", "mesh.yaml", "demo", expected_version=first.version)
    assert (stale.value.expected, stale.value.live) == (first.version, second.version)
    assert rec.configs == [first, second]

    # The history keeps the last CONFIG_HISTORY versions.
    versions = [second.version]
    for n in range(3):
        versions.append((await store.put_config(f"doc{n + 4}", "mesh.yaml", "demo")).version)
    history = await raw.get_prefix(f"{prefix}config-history/".encode())
    assert [int(kv.key.rsplit(b"/", 1)[1]) for kv in history] == versions[-3:]


async def test_the_events_of_one_revision_are_one_change(
    make_store: StoreFactory, raw: Any, prefix: str
) -> None:
    store, rec = await make_store()
    lease_id, v1 = await store.register(instance(1), ttl=5)
    await rec.change_at(v1)

    def key(n: int) -> bytes:
        return f"{prefix}instances/llm/i{n}".encode()

    t = raw.transactions
    await raw.transaction(  # one revision: a put, a delete, and a value that is no instance
        compare=[],
        success=[
            t.put(key(2), instance(2).to_proto().SerializeToString()),
            t.delete(key(1)),
            t.put(key(3), b"not an instance"),
        ],
        failure=[],  # aetcd 1.0 fails on its own default (None)
    )

    version, ups, gone = await rec.change_after(v1)
    assert ups == [instance(2)]
    assert sorted(gone) == [("llm", "i1"), ("llm", "i3")]
    assert (await raw.get(key(2))).mod_revision == version
    assert rec.catalog == {("llm", "i2"): instance(2)}
    assert await store.deregister(lease_id=lease_id) is None  # it went with i1's key


# -- replicas -----------------------------------------------------------------------------


async def test_two_replicas_see_the_same_changes_at_the_same_versions(
    make_store: StoreFactory,
) -> None:
    a, rec_a = await make_store()
    b, rec_b = await make_store()

    lease_id, v1 = await a.register(instance(1), ttl=5)
    assert await rec_a.change_at(v1) == await rec_b.change_at(v1)

    # The instance renews on the other replica.
    assert await b.keepalive(lease_id, False) == 5.0
    v2, ups, _ = await rec_b.change_after(v1)
    assert ups == [instance(1, lease_id=lease_id, serving=False)]
    assert await rec_a.change_at(v2) == (v2, ups, [])

    v3 = await b.deregister(lease_id=lease_id)
    assert v3 is not None
    assert await rec_a.change_at(v3) == await rec_b.change_at(v3) == (v3, [], [("llm", "i1")])

    record = await b.put_config("doc", "mesh.yaml", "demo")
    assert await rec_a.config_at(record.version) == record
    assert rec_a.changes == rec_b.changes
    assert rec_a.errors == rec_b.errors == []


async def test_keepalive_for_a_lease_this_replica_has_not_seen(
    make_store: StoreFactory, etcd: EtcdServer, prefix: str
) -> None:
    a, rec = await make_store()
    lease_id, v1 = await a.register(instance(1), ttl=5)
    # A replica that watches nothing: it finds the lease's instance through etcd.
    blind = EtcdStore(etcd.endpoint, prefix)
    try:
        assert await blind.keepalive(lease_id, False) == 5.0
        _, ups, _ = await rec.change_after(v1)
        assert ups == [instance(1, lease_id=lease_id, serving=False)]
        assert await blind.deregister(lease_id=lease_id) is not None
        await rec.wait_for(lambda: not rec.catalog)
    finally:
        await blind.close()


async def test_open_reports_what_is_stored(make_store: StoreFactory) -> None:
    a, _ = await make_store()
    lease1, _ = await a.register(instance(1), ttl=30)
    lease2, _ = await a.register(instance(2, service="embed"), ttl=30)
    record = await a.put_config("doc", "mesh.yaml", "demo")

    _, rec = await make_store()  # another replica, started now

    [(version, items)] = rec.resets
    assert version >= record.version
    assert items == {
        ("llm", "i1"): instance(1, lease_id=lease1),
        ("embed", "i2"): instance(2, service="embed", lease_id=lease2),
    }
    assert rec.configs == [record]
    assert rec.changes == []


# -- etcd going away ----------------------------------------------------------------------


async def test_the_watch_resyncs_after_an_etcd_restart(
    etcd_installed: None, tmp_path: Path, prefix: str
) -> None:
    server = EtcdServer("aimesh-restart")
    server.start(tmp_path / "data")
    store, rec = EtcdStore(server.endpoint, prefix, timeout=2.0), Recorder()
    try:
        await store.open(rec)
        lease_id, v1 = await store.register(instance(1), ttl=30)
        await rec.change_at(v1)

        await asyncio.to_thread(server.stop)
        with pytest.raises(StoreUnavailable, match=r"etcd at 127\.0\.0\.1"):
            await store.register(instance(2), ttl=30)
        assert data_dir_kept(server)
        await asyncio.to_thread(
            server.start, tmp_path / "data", server.client_port, server.peer_port
        )

        version, items = (await rec.wait_for(lambda: rec.resets[1:], timeout=10.0))[0]
        assert version >= v1 and items == {("llm", "i1"): instance(1, lease_id=lease_id)}
        assert await store.keepalive(lease_id, None) == 30.0  # the lease survived
        lease2, v2 = await store.register(instance(2), ttl=30)
        assert await rec.change_at(v2) == (v2, [instance(2, lease_id=lease2)], [])
    finally:
        await store.close()
        server.stop()


def data_dir_kept(server: EtcdServer) -> bool:
    return server.data_dir is not None and (server.data_dir / "member").is_dir()


async def test_unreachable_etcd(etcd: EtcdServer, prefix: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    store = EtcdStore(dead, prefix, open_timeout=0.3)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        await store.open(Recorder())
    with pytest.raises(StoreUnavailable):
        await store.register(instance(1), ttl=5)
    await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.keepalive(1, None)

    # The first endpoint that answers is used.
    store, rec = EtcdStore(f"{dead},{etcd.endpoint}", prefix), Recorder()
    try:
        await store.open(rec)
        _, version = await store.register(instance(1), ttl=5)
        await rec.change_at(version)
    finally:
        await store.close()


def test_endpoints_are_parsed() -> None:
    assert parse_endpoints("a:1, http://b:2/,[::1]:2379") == [
        ("a", 1),
        ("b", 2),
        ("[::1]", 2379),
    ]
    for bad in ("", "a", "a:b", "a:0", "https://a:1"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)
