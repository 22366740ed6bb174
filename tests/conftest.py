"""Shared fixtures: real grpc.aio sim backends on 127.0.0.1 (port 0) and real channels."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from hypothesis import settings

from aimesh.mesh import procs
from aimesh.mesh.config import load_dict
from aimesh.mesh.control.etcd_server import EtcdServer, find_etcd
from aimesh.mesh.proxy.cluster import EndpointAddr
from aimesh.mesh.proxy.server import Proxy, ProxySettings
from aimesh.mesh.sim.faults import Faults
from aimesh.mesh.sim.server import RunningSim, start_sim
from aimesh.mesh.sim.service import SimConfig

from .support import FAST, SimFactory, installed

ROOT = Path(__file__).resolve().parent.parent

# Property tests explore the same examples on every run (a failure found once is found
# again, and CI never fails on a fresh draw); no per-example deadline on a loaded machine.
settings.register_profile("aimesh", derandomize=True, deadline=None)
settings.load_profile("aimesh")


@pytest.fixture
async def make_sim() -> AsyncIterator[SimFactory]:
    started: list[RunningSim] = []

    async def _make(
        config: SimConfig = FAST,
        *,
        faults: Faults | None = None,
        seed: int | None = 1,
        **changes: object,
    ) -> RunningSim:
        sim = await start_sim(replace(config, **changes), "127.0.0.1:0", faults=faults, seed=seed)
        started.append(sim)
        return sim

    yield _make
    for sim in started:
        await sim.server.stop(None)


@pytest.fixture
async def sim(make_sim: SimFactory) -> RunningSim:
    return await make_sim()


@pytest.fixture
async def channel(sim: RunningSim) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sim.port}") as ch:
        yield ch


@pytest.fixture(scope="session")
def sim_process_address() -> Iterator[str]:
    """A sim backend in its own process, for sync (blocking) clients."""
    proc = procs.start_sim("sim-proc", ["gpt-4", "claude-3-5-sonnet"], "--ttft", "0", "--tps", "0")
    try:
        yield proc.address
    finally:
        proc.terminate()


@pytest.fixture
async def make_proxy() -> AsyncIterator[Callable[..., Awaitable[Proxy]]]:
    started: list[Proxy] = []

    async def _make(
        doc: dict[str, object],
        *,
        seed: int = 7,
        extra: dict[str, list[EndpointAddr]] | None = None,
        **settings: Any,
    ) -> Proxy:
        proxy = Proxy(
            ProxySettings(listen="127.0.0.1:0", seed=seed, extra_endpoints=extra or {}, **settings)
        )
        await proxy.start(load_dict(doc, source="test"))
        started.append(proxy)
        return proxy

    yield _make
    for p in started:
        await p.stop(0.5)


# -- etcd (the control plane's multi-replica store) ---------------------------------------


def _find_etcd() -> str | None:
    try:
        return str(find_etcd())
    except RuntimeError:
        return None


def _etcd_missing() -> str | None:
    """None when etcd is there (installed by scripts/install-etcd.sh if need be)."""
    found, output = installed(_find_etcd, "install-etcd.sh")
    if found:
        return None
    return f"etcd is not installed and scripts/install-etcd.sh could not install it: {output}"


@pytest.fixture(scope="session")
def etcd_installed() -> None:
    why = _etcd_missing()
    if why:
        pytest.skip(why)


@pytest.fixture(scope="session")
def etcd(etcd_installed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer("aimesh-test")
    server.start(tmp_path_factory.mktemp("etcd") / "data")
    yield server
    server.stop()
