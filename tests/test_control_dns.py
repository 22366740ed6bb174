"""The control plane's DNS server, queried over real UDP/TCP sockets by dnspython (an
independent client, so dnslib is not checked against itself)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import dns.asyncquery
import dns.asyncresolver
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from aimesh.mesh.control.catalog import Instance, Snapshot
from aimesh.mesh.control.dns import DnsServer, instance_labels

TTL = 7
TIMEOUT = 2.0


def snapshot(version: int, instances: Iterable[Instance]) -> Snapshot:
    return Snapshot(version, MappingProxyType({i.key: i for i in instances}))


LLM = [
    Instance("llm", "gpu-a", "10.0.0.1:9000", weight=3),
    Instance("llm", "gpu-b", "10.0.0.2:9001", weight=1),
    Instance("llm", "gpu-c", "10.0.0.3:9002", weight=5, serving=False),
    # A host name: left out of A/AAAA, but an SRV target as itself.
    Instance("llm", "edge", "edge-1.example.net:9443", weight=2),
]
EMBED = [
    Instance("embed", "v6", "[fd00::7]:7000"),
    Instance("embed", "10.0.0.7:7001", "10.0.0.7:7001"),  # the id needs a DNS-safe label
]
IDLE = [Instance("idle", "i1", "10.0.1.1:1", serving=False)]


class Live:
    """The snapshot source: tests swap `.current` and the server must follow."""

    def __init__(self, current: Snapshot) -> None:
        self.current = current

    def __call__(self) -> Snapshot:
        return self.current


@dataclass
class Served:
    server: DnsServer
    port: int
    live: Live

    async def udp(self, name: str, rdtype: str, **kw: Any) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype, **kw)
        return await dns.asyncquery.udp(query, "127.0.0.1", timeout=TIMEOUT, port=self.port)

    async def tcp(self, name: str, rdtype: str) -> dns.message.Message:
        query = dns.message.make_query(name, rdtype)
        return await dns.asyncquery.tcp(query, "127.0.0.1", timeout=TIMEOUT, port=self.port)

    def resolver(self) -> dns.asyncresolver.Resolver:
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = ["127.0.0.1"]
        r.port = self.port
        r.timeout = r.lifetime = TIMEOUT
        return r


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    live = Live(snapshot(41, LLM + EMBED + IDLE))
    server = DnsServer(live, domain="mesh.local", ttl=TTL)
    port = await server.start("127.0.0.1:0")
    yield Served(server, port, live)
    await server.stop()


def records(msg: dns.message.Message, section: str, rdtype: str) -> list[Any]:
    """The rdata of one type in a section ('answer', 'authority', 'additional')."""
    want = dns.rdatatype.from_text(rdtype)
    return [rd for rrset in getattr(msg, section) if rrset.rdtype == want for rd in rrset]


def owners(msg: dns.message.Message, section: str, rdtype: str) -> dict[str, list[str]]:
    want = dns.rdatatype.from_text(rdtype)
    out: dict[str, list[str]] = {}
    for rrset in getattr(msg, section):
        if rrset.rdtype == want:
            out.setdefault(str(rrset.name), []).extend(sorted(rd.to_text() for rd in rrset))
    return out


def assert_soa(msg: dns.message.Message, serial: int = 41) -> None:
    assert msg.flags & dns.flags.AA
    assert not msg.answer
    (soa,) = records(msg, "authority", "SOA")
    assert str(soa.mname) == "ns.mesh.local."
    assert str(soa.rname) == "hostmaster.mesh.local."
    assert soa.serial == serial
    assert soa.minimum == TTL  # the negative-caching TTL
    assert msg.authority[0].ttl == TTL


# --- A / AAAA ------------------------------------------------------------------------------


async def test_a_lists_serving_ipv4_instances(served: Served) -> None:
    answer = await served.resolver().resolve("llm.mesh.local", "A")
    assert sorted(rd.address for rd in answer) == ["10.0.0.1", "10.0.0.2"]  # gpu-c not serving
    assert answer.rrset is not None and answer.rrset.ttl == TTL
    assert answer.response.flags & dns.flags.AA


async def test_names_are_case_insensitive_and_echo_the_question(served: Served) -> None:
    msg = await served.udp("LLM.Mesh.LOCAL.", "A")
    assert msg.rcode() == dns.rcode.NOERROR
    assert str(msg.question[0].name) == "LLM.Mesh.LOCAL."
    assert sorted(rd.address for rd in records(msg, "answer", "A")) == ["10.0.0.1", "10.0.0.2"]


async def test_aaaa_for_ipv6_instances_and_a_only_for_ipv4(served: Served) -> None:
    msg = await served.udp("embed.mesh.local", "AAAA")
    assert [rd.address for rd in records(msg, "answer", "AAAA")] == ["fd00::7"]
    msg = await served.udp("embed.mesh.local", "A")
    assert [rd.address for rd in records(msg, "answer", "A")] == ["10.0.0.7"]


async def test_instance_names_resolve_one_instance(served: Served) -> None:
    msg = await served.udp("v6.embed.mesh.local", "AAAA")
    assert [rd.address for rd in records(msg, "answer", "AAAA")] == ["fd00::7"]
    msg = await served.udp("10-0-0-7-7001.embed.mesh.local", "A")
    assert [rd.address for rd in records(msg, "answer", "A")] == ["10.0.0.7"]
    # A registered instance that is not serving: the name exists, with no address.
    msg = await served.udp("gpu-c.llm.mesh.local", "A")
    assert msg.rcode() == dns.rcode.NOERROR
    assert_soa(msg)
    msg = await served.udp("gpu-z.llm.mesh.local", "A")
    assert msg.rcode() == dns.rcode.NXDOMAIN


# --- SRV -----------------------------------------------------------------------------------

LLM_SRV = {
    (0, 3, 9000, "gpu-a.llm.mesh.local."),
    (0, 1, 9001, "gpu-b.llm.mesh.local."),
    (0, 2, 9443, "edge-1.example.net."),
}
LLM_GLUE = {"gpu-a.llm.mesh.local.": ["10.0.0.1"], "gpu-b.llm.mesh.local.": ["10.0.0.2"]}


def srv_set(msg: dns.message.Message) -> set[tuple[int, int, int, str]]:
    return {
        (rd.priority, rd.weight, rd.port, str(rd.target)) for rd in records(msg, "answer", "SRV")
    }


@pytest.mark.parametrize("name", ["llm.mesh.local", "_grpc._tcp.llm.mesh.local"])
async def test_srv_with_weights_ports_targets_and_glue(served: Served, name: str) -> None:
    msg = await served.udp(name, "SRV")
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
    assert srv_set(msg) == LLM_SRV
    assert all(rrset.ttl == TTL for rrset in msg.answer)
    assert owners(msg, "additional", "A") == LLM_GLUE
    # The glue is what a client would get asking for the target itself.
    again = await served.udp("gpu-a.llm.mesh.local", "A")
    assert [rd.address for rd in records(again, "answer", "A")] == ["10.0.0.1"]


async def test_srv_glue_for_ipv6_targets(served: Served) -> None:
    msg = await served.udp("_grpc._tcp.embed.mesh.local", "SRV")
    assert srv_set(msg) == {
        (0, 1, 7000, "v6.embed.mesh.local."),
        (0, 1, 7001, "10-0-0-7-7001.embed.mesh.local."),
    }
    assert owners(msg, "additional", "AAAA") == {"v6.embed.mesh.local.": ["fd00::7"]}
    assert owners(msg, "additional", "A") == {"10-0-0-7-7001.embed.mesh.local.": ["10.0.0.7"]}


async def test_any_answers_srv_a_and_aaaa(served: Served) -> None:
    msg = await served.tcp("embed.mesh.local", "ANY")
    assert {rrset.rdtype for rrset in msg.answer} == {
        dns.rdatatype.SRV,
        dns.rdatatype.A,
        dns.rdatatype.AAAA,
    }


# --- the apex and negative answers ---------------------------------------------------------


async def test_apex_soa_and_ns(served: Served) -> None:
    msg = await served.udp("mesh.local", "SOA")
    (soa,) = records(msg, "answer", "SOA")
    assert (str(soa.mname), str(soa.rname), soa.serial) == (
        "ns.mesh.local.",
        "hostmaster.mesh.local.",
        41,
    )
    msg = await served.udp("mesh.local.", "NS")
    assert owners(msg, "answer", "NS") == {"mesh.local.": ["ns.mesh.local."]}


async def test_unknown_service_is_nxdomain_with_soa(served: Served) -> None:
    msg = await served.udp("nope.mesh.local", "A")
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert_soa(msg)
    with pytest.raises(dns.resolver.NXDOMAIN):
        await served.resolver().resolve("nope.mesh.local", "SRV")


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("idle.mesh.local", "A"),  # every instance registered but not serving
        ("idle.mesh.local", "SRV"),
        ("llm.mesh.local", "AAAA"),  # a service with only IPv4 instances
        ("llm.mesh.local", "TXT"),  # a type we do not serve
        ("_tcp.llm.mesh.local", "SRV"),  # an empty non-terminal (RFC 8020: not NXDOMAIN)
        ("_grpc._tcp.llm.mesh.local", "A"),
    ],
)
async def test_nodata_is_noerror_with_soa(served: Served, name: str, rdtype: str) -> None:
    msg = await served.udp(name, rdtype)
    assert msg.rcode() == dns.rcode.NOERROR
    assert_soa(msg)


@pytest.mark.parametrize("name", ["example.com", "mesh.local.example.com", "local"])
async def test_names_outside_the_domain_are_refused(served: Served, name: str) -> None:
    msg = await served.udp(name, "A")
    assert msg.rcode() == dns.rcode.REFUSED
    assert not msg.answer


# --- transports ----------------------------------------------------------------------------


async def test_tcp_answers(served: Served) -> None:
    msg = await served.tcp("_grpc._tcp.llm.mesh.local", "SRV")
    assert srv_set(msg) == LLM_SRV
    answer = await served.resolver().resolve("llm.mesh.local", "A", tcp=True)
    assert sorted(rd.address for rd in answer) == ["10.0.0.1", "10.0.0.2"]


async def test_tcp_several_queries_on_one_connection(served: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        queries = [dns.message.make_query(n, "A") for n in ("llm.mesh.local", "nope.mesh.local")]
        # Pipelined: both written before either reply is read.
        for q in queries:
            wire = q.to_wire()
            writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        replies = []
        for _ in queries:
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), TIMEOUT), "big")
            replies.append(dns.message.from_wire(await reader.readexactly(size)))
        assert [r.id for r in replies] == [q.id for q in queries]
        assert [r.rcode() for r in replies] == [dns.rcode.NOERROR, dns.rcode.NXDOMAIN]
    finally:
        writer.close()


async def test_idle_tcp_connections_are_closed(served: Served) -> None:
    served.server.tcp_idle_timeout = 0.2
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # EOF: the server hung up
    finally:
        writer.close()


async def test_stop_closes_open_tcp_connections() -> None:
    server = DnsServer(Live(snapshot(1, LLM)))
    port = await server.start("127.0.0.1:0")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await asyncio.wait_for(server.stop(), TIMEOUT)  # does not wait for the idle timeout
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    finally:
        writer.close()


async def test_answers_follow_the_snapshot_without_restart(served: Served) -> None:
    resolver = served.resolver()
    before = await resolver.resolve("llm.mesh.local", "A")
    assert sorted(rd.address for rd in before) == ["10.0.0.1", "10.0.0.2"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("new.mesh.local", "A")

    served.live.current = snapshot(
        2**32 + 5,  # the SOA serial is the version mod 2**32
        [
            Instance("llm", "gpu-a", "10.0.0.1:9000", serving=False),
            LLM[1],
            Instance("llm", "gpu-d", "10.0.0.4:9000"),
            Instance("new", "n1", "10.0.2.1:80"),
        ],
    )
    after = await resolver.resolve("llm.mesh.local", "A")
    assert sorted(rd.address for rd in after) == ["10.0.0.2", "10.0.0.4"]
    new = await resolver.resolve("new.mesh.local", "A")
    assert [rd.address for rd in new] == ["10.0.2.1"]
    msg = await served.udp("embed.mesh.local", "A")  # gone from the catalog
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert_soa(msg, serial=5)


async def test_large_answers_truncate_over_udp_and_fit_over_tcp() -> None:
    many = [Instance("big", f"i{n}", f"10.1.0.{n}:9000") for n in range(1, 61)]
    server = DnsServer(Live(snapshot(1, many)))
    port = await server.start("127.0.0.1:0")
    try:
        plain = await dns.asyncquery.udp(
            dns.message.make_query("big.mesh.local", "A"), "127.0.0.1", TIMEOUT, port
        )
        assert plain.flags & dns.flags.TC and not plain.answer  # > 512 bytes without EDNS
        edns = await dns.asyncquery.udp(
            dns.message.make_query("big.mesh.local", "A", use_edns=0, payload=4096),
            "127.0.0.1",
            TIMEOUT,
            port,
        )
        assert not edns.flags & dns.flags.TC and edns.edns == 0
        assert len(records(edns, "answer", "A")) == 60
        full = await dns.asyncquery.tcp(
            dns.message.make_query("big.mesh.local", "SRV"), "127.0.0.1", TIMEOUT, port
        )
        assert len(records(full, "answer", "SRV")) == 60
        assert len(records(full, "additional", "A")) == 60
    finally:
        await server.stop()


# --- malformed input -----------------------------------------------------------------------


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received.put_nowait(data)


HEADER_ONE_QUESTION = bytes.fromhex("abcd 0100 0001 0000 0000 0000")


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\x01",
        b"not dns at all",  # 14 bytes: parses as a header, then nothing makes sense
        HEADER_ONE_QUESTION,  # promises a question, carries none
        HEADER_ONE_QUESTION + b"\xc0\x0c\x00\x01\x00\x01",  # a name pointing at itself
        HEADER_ONE_QUESTION + b"\x3fabc",  # a label longer than the packet
        bytes.fromhex("abcd 8180 0000 0000 0000 0000"),  # a response, not a query
    ],
)
async def test_malformed_udp_gets_formerr_or_nothing(served: Served, garbage: bytes) -> None:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        _Datagrams, remote_addr=("127.0.0.1", served.port)
    )
    try:
        transport.sendto(garbage)
        # A valid query right after: the server handles datagrams in order, so anything it
        # says about the garbage arrives first, and the valid reply proves it still serves.
        query = dns.message.make_query("llm.mesh.local", "A")
        query.id = 0x1234
        transport.sendto(query.to_wire())
        while True:
            data = await asyncio.wait_for(proto.received.get(), TIMEOUT)
            if data[:2] == b"\x12\x34":
                break
            # Not the valid reply: it must be a FORMERR about the garbage, same id.
            assert data[:2] == garbage[:2]
            header = dns.message.from_wire(data, question_only=True)
            assert header.rcode() == dns.rcode.FORMERR
            assert header.flags & dns.flags.QR
        reply = dns.message.from_wire(data)
        assert sorted(rd.address for rd in records(reply, "answer", "A")) == [
            "10.0.0.1",
            "10.0.0.2",
        ]
    finally:
        transport.close()


def test_formerr_for_a_parsable_header() -> None:
    server = DnsServer(Live(snapshot(1, LLM)))
    reply = dns.message.from_wire(server.answer(HEADER_ONE_QUESTION), question_only=True)
    assert reply.id == 0xABCD and reply.rcode() == dns.rcode.FORMERR
    assert server.answer(b"\x01\x02") == b""


# --- labels --------------------------------------------------------------------------------


def test_instance_labels_are_dns_safe_unique_and_order_independent() -> None:
    ids = ["gpu-a", "10.0.0.1:9000", "10.0.0.1_9000", "10-0-0-1-9000", "GPU-B", "-x-", "é" * 100]
    labels = instance_labels(ids)
    assert labels == instance_labels(reversed(ids))
    assert len(set(labels.values())) == len(ids)
    assert labels["gpu-a"] == "gpu-a" and labels["GPU-B"] == "gpu-b" and labels["-x-"] == "x"
    assert labels["10-0-0-1-9000"] == "10-0-0-1-9000"  # the id that *is* the label keeps it
    assert labels["10.0.0.1:9000"].startswith("10-0-0-1-9000-")
    for label in labels.values():
        assert 1 <= len(label) <= 63
        assert set(label) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
        assert not label.startswith("-") and not label.endswith("-")
