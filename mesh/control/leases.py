"""Leases for the embedded store (pure; the clock comes in as a parameter).

An instance is in the catalog while its lease is alive; the lease lives `ttl` seconds past
its last renewal. The etcd store does not use this: etcd keeps its own leases.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

MIN_TTL = 1.0
MAX_TTL = 3600.0
DEFAULT_TTL = 5.0


def check_ttl(ttl: float) -> float:
    """0 means the default; otherwise between MIN_TTL and MAX_TTL (ValueError says so)."""
    if ttl == 0:
        return DEFAULT_TTL
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise ValueError(
            f"ttl: {ttl:g}s is outside {MIN_TTL:g}s..{MAX_TTL:g}s; 0 means the default "
            f"({DEFAULT_TTL:g}s)"
        )
    return ttl


@dataclass(slots=True)
class Lease:
    lease_id: int
    ttl: float
    expires_at: float


class LeaseTable:
    def __init__(self, clock: Callable[[], float], first_id: int = 1) -> None:
        self._clock = clock
        self._leases: dict[int, Lease] = {}
        self._next_id = first_id
        # (expires_at, lease_id); stale entries (renewed or revoked leases) are skipped.
        self._heap: list[tuple[float, int]] = []

    def __contains__(self, lease_id: int) -> bool:
        return lease_id in self._leases

    def __len__(self) -> int:
        return len(self._leases)

    def get(self, lease_id: int) -> Lease | None:
        return self._leases.get(lease_id)

    def grant(self, ttl: float) -> Lease:
        lease = Lease(self._next_id, ttl, self._clock() + ttl)
        self._next_id += 1
        self._leases[lease.lease_id] = lease
        heapq.heappush(self._heap, (lease.expires_at, lease.lease_id))
        return lease

    def restore(self, lease_id: int, ttl: float) -> Lease:
        """A lease loaded from disk after a restart: it gets a full `ttl` from now, so its
        holder has time to reconnect and renew before it is taken to be gone."""
        lease = Lease(lease_id, ttl, self._clock() + ttl)
        self._leases[lease_id] = lease
        self._next_id = max(self._next_id, lease_id + 1)
        heapq.heappush(self._heap, (lease.expires_at, lease_id))
        return lease

    def renew(self, lease_id: int) -> Lease | None:
        """None when the lease is unknown or already expired."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return None
        now = self._clock()
        if lease.expires_at <= now:
            return None  # expired but not yet collected: too late all the same
        lease.expires_at = now + lease.ttl
        heapq.heappush(self._heap, (lease.expires_at, lease_id))
        return lease

    def revoke(self, lease_id: int) -> bool:
        return self._leases.pop(lease_id, None) is not None

    def expired(self) -> list[int]:
        """Removes and returns the leases whose time is up."""
        now = self._clock()
        out: list[int] = []
        while self._heap and self._heap[0][0] <= now:
            at, lease_id = heapq.heappop(self._heap)
            lease = self._leases.get(lease_id)
            if lease is not None and lease.expires_at == at:
                del self._leases[lease_id]
                out.append(lease_id)
        return out

    def next_expiry(self) -> float | None:
        """When `expired()` may next return something (clock time), or None."""
        while self._heap:
            at, lease_id = self._heap[0]
            lease = self._leases.get(lease_id)
            if lease is not None and lease.expires_at == at:
                return at
            heapq.heappop(self._heap)
        return None
