"""The service catalog: registered instances as immutable, versioned snapshots (pure; no I/O).

A `Catalog` takes changes from a store (`apply`) and answers two questions watchers ask:
what is the catalog now (`snapshot`), and what changed since version N (`since`). It keeps
a bounded history of changes, so a watcher that reconnects gets the increments it missed
instead of the whole catalog; one that fell further behind gets a full snapshot.

Versions only grow. The embedded store numbers changes itself; the etcd store passes etcd
revisions, so every replica gives the same version to the same catalog.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from aimesh.control.v1 import control_plane_pb2 as pb

from ..config import is_dns_label, parse_host_port

Key = tuple[str, str]  # (service, instance_id)

MAX_LABELS = 64


@dataclass(frozen=True, slots=True)
class Instance:
    service: str
    instance_id: str
    address: str
    models: tuple[str, ...] = ()
    version: str = ""
    zone: str = ""
    weight: int = 1
    labels: Mapping[str, str] = field(default_factory=dict)
    serving: bool = True
    registered_at: float = 0.0  # wall-clock seconds (time.time()), set by the control plane
    lease_id: int = 0

    @property
    def key(self) -> Key:
        return (self.service, self.instance_id)

    def to_proto(self) -> pb.Instance:
        msg = pb.Instance(
            service=self.service,
            address=self.address,
            instance_id=self.instance_id,
            models=self.models,
            version=self.version,
            zone=self.zone,
            weight=self.weight,
            labels=dict(self.labels),
            serving=self.serving,
            lease_id=self.lease_id,
        )
        if self.registered_at:
            msg.registered_at.FromNanoseconds(int(self.registered_at * 1e9))
        return msg

    @classmethod
    def from_proto(cls, msg: pb.Instance) -> Instance:
        """Builds an instance from a request, checking every field; ValueError names the
        first bad one as `instance.FIELD`."""
        if not msg.service:
            raise ValueError("instance.service: required, e.g. 'gpt4-gateway'")
        if not is_dns_label(msg.service):
            raise ValueError(
                f"instance.service: {msg.service!r} is not a DNS label (lowercase letters, "
                "digits and '-'); DNS discovery serves it as <service>.<mesh-domain>"
            )
        if not msg.address:
            raise ValueError("instance.address: required, HOST:PORT where the instance serves")
        try:
            parse_host_port(msg.address)
        except ValueError as exc:
            raise ValueError(f"instance.address: {exc}") from None
        if len(msg.labels) > MAX_LABELS:
            raise ValueError(f"instance.labels: at most {MAX_LABELS} labels")
        if any(not m for m in msg.models):
            raise ValueError("instance.models: model names must not be empty")
        return cls(
            service=msg.service,
            instance_id=msg.instance_id or msg.address,
            address=msg.address,
            models=tuple(msg.models),
            version=msg.version,
            zone=msg.zone,
            weight=msg.weight or 1,
            labels=MappingProxyType(dict(msg.labels)),
            serving=msg.serving if msg.HasField("serving") else True,
            registered_at=msg.registered_at.ToNanoseconds() / 1e9
            if msg.HasField("registered_at")
            else 0.0,
            lease_id=msg.lease_id,
        )


@dataclass(frozen=True, slots=True)
class Change:
    """One published change: the catalog at `version` is the previous one with `upserted`
    added or replaced and `removed` taken out."""

    version: int
    upserted: tuple[Instance, ...] = ()
    removed: tuple[Key, ...] = ()


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    instances: Mapping[Key, Instance]

    def services(self) -> dict[str, list[Instance]]:
        """Instances by service, each list ordered by instance id (stable output)."""
        out: dict[str, list[Instance]] = {}
        for key in sorted(self.instances):
            out.setdefault(key[0], []).append(self.instances[key])
        return out

    def models(self) -> dict[str, str]:
        """model -> the service whose instances serve it. A model served by several
        services maps to none of them (the config must say which one to use)."""
        owners: dict[str, set[str]] = {}
        for inst in self.instances.values():
            for m in inst.models:
                owners.setdefault(m, set()).add(inst.service)
        return {m: next(iter(s)) for m, s in owners.items() if len(s) == 1}

    def to_proto(self, services: Iterable[str] = ()) -> pb.CatalogSnapshot:
        wanted = set(services)
        return pb.CatalogSnapshot(
            version=self.version,
            instances=[
                self.instances[k].to_proto()
                for k in sorted(self.instances)
                if not wanted or k[0] in wanted
            ],
        )


EMPTY = Snapshot(0, MappingProxyType({}))


class Catalog:
    """The live catalog and a bounded history of changes."""

    def __init__(self, history: int = 4096) -> None:
        self._snapshot = EMPTY
        self._history: deque[Change] = deque(maxlen=history)
        # The version the history starts from: a watcher at `_base` or later can be sent
        # increments; one from before it needs a full snapshot.
        self._base = 0

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def version(self) -> int:
        return self._snapshot.version

    def reset(self, version: int, instances: Iterable[Instance]) -> Change:
        """Replaces everything (a store's initial load, or a resync). History restarts:
        watchers behind `version` get a full snapshot."""
        items = {i.key: i for i in instances}
        self._snapshot = Snapshot(version, MappingProxyType(items))
        self._history.clear()
        self._base = version
        return Change(version, tuple(items.values()))

    def apply(
        self, version: int, upserted: Iterable[Instance] = (), removed: Iterable[Key] = ()
    ) -> Change | None:
        """Publishes a change as `version`. Returns None when nothing actually changed
        (a re-registration with identical data, a removal of an unknown key) or when the
        version is not newer than the current one (a store replaying old events)."""
        if version <= self._snapshot.version:
            return None
        items = dict(self._snapshot.instances)
        ups = [i for i in upserted if items.get(i.key) != i]
        for inst in ups:
            items[inst.key] = inst
        gone = [k for k in dict.fromkeys(removed) if k in items]
        for key in gone:
            del items[key]
        if not ups and not gone:
            return None
        change = Change(version, tuple(ups), tuple(gone))
        self._snapshot = Snapshot(version, MappingProxyType(items))
        if len(self._history) == self._history.maxlen:
            self._base = self._history[0].version
        self._history.append(change)
        return change

    def since(self, version: int) -> list[Change] | None:
        """The changes after `version`, oldest first; None when the history no longer
        reaches back that far (or `version` is from the future: a different store)."""
        current = self._snapshot.version
        if version == current:
            return []
        # Versions need not be contiguous (etcd revisions also count other keys), so what
        # decides is whether the history starts at or before the watcher's version.
        if version > current or version < self._base:
            return None
        # Newest first, stopping at the watcher's version: a watcher that is one change
        # behind costs one step, not a walk over the whole history.
        out: list[Change] = []
        for change in reversed(self._history):
            if change.version <= version:
                break
            out.append(change)
        out.reverse()
        return out


def merge(changes: list[Change]) -> Change:
    """Several changes as one (what a slow watcher is sent): last write wins per key."""
    upserted: dict[Key, Instance] = {}
    removed: dict[Key, None] = {}
    for c in changes:
        for inst in c.upserted:
            upserted[inst.key] = inst
            removed.pop(inst.key, None)
        for key in c.removed:
            upserted.pop(key, None)
            removed[key] = None
    return Change(changes[-1].version, tuple(upserted.values()), tuple(removed))


def with_serving(inst: Instance, serving: bool) -> Instance:
    return replace(inst, serving=serving)
