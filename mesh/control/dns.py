"""DNS discovery for the control plane: `<service>.<domain>` answered from the live catalog.

Clients that only speak DNS (gRPC's `dns:///` resolver, `dig`, a sidecar-less pod) find
instances here without talking to the control-plane API. The server is authoritative for
one domain (default `mesh.local`) and answers from whatever `snapshot()` returns at the
moment of the query, so a registration shows up on the next query, with no restart.

Names in the zone:

    <domain>                            SOA, NS
    <service>.<domain>                  A / AAAA (serving IP instances), SRV (all serving)
    _grpc._tcp.<service>.<domain>       SRV (the conventional service-discovery name)
    <instance>.<service>.<domain>       A / AAAA of one serving instance (the SRV targets)

dnslib does the wire format only; the transports are asyncio (UDP, and TCP with the 2-byte
length prefix of RFC 1035 4.2.2), not dnslib's threaded server, so the server runs in the
control plane's event loop next to everything else. `DnsServer.answer` is the whole DNS
logic, bytes in and bytes out, with no I/O: both transports call it and tests can too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from dnslib import (
    AAAA,
    CLASS,
    EDNS0,
    NS,
    OPCODE,
    QTYPE,
    RCODE,
    RR,
    SOA,
    SRV,
    A,
    DNSBuffer,
    DNSHeader,
    DNSLabel,
    DNSRecord,
)

from ..config import is_dns_label, parse_host_port
from .catalog import Instance, Snapshot

log = logging.getLogger("aimesh.control.dns")

Name = tuple[bytes, ...]  # a domain name as lowercase labels, leftmost first, no root label
IP = ipaddress.IPv4Address | ipaddress.IPv6Address

# RFC 7766 6.2.3: a server should close idle TCP connections; seconds between queries.
TCP_IDLE_TIMEOUT = 10.0
# Each TCP connection holds a socket and a task; a cap keeps a flood from exhausting fds.
MAX_TCP_CONNECTIONS = 512
# Without EDNS a UDP reply may be at most 512 bytes (RFC 1035 2.3.4). With EDNS we still cap
# at 1232, the size DNS Flag Day 2020 settled on to avoid IP fragmentation.
UDP_PLAIN_SIZE = 512
UDP_EDNS_SIZE = 1232
TCP_MAX_SIZE = 65535  # the 2-byte length prefix
BIND_ATTEMPTS = 5

# The SOA's refresh/retry/expire only matter to secondaries doing zone transfers, which this
# server does not offer; conventional values. Its minimum is the negative-caching TTL
# (RFC 2308), set to the record TTL so a new service is not hidden longer than a change is.
_SOA_REFRESH, _SOA_RETRY, _SOA_EXPIRE = 3600, 600, 86400

_GRPC_TCP: Name = (b"_grpc", b"_tcp")
_UNSAFE = re.compile(r"[^a-z0-9-]")
_BADVERS = 16  # extended RCODE (RFC 6891): an EDNS version we do not speak
_CLASS_ANY = 255  # QCLASS "*" (dnslib names it '*', so no attribute to spell)


# --- instance labels ---------------------------------------------------------------------


def _base_label(instance_id: str) -> str:
    # Leading/trailing '-' are legal in DNS but not in host names (RFC 1123), and some
    # resolvers reject them in SRV targets; strip them.
    text = _UNSAFE.sub("-", instance_id.lower()).strip("-")[:63].rstrip("-")
    return text or "instance"


def instance_labels(instance_ids: Iterable[str]) -> dict[str, str]:
    """instance id -> a DNS label unique among `instance_ids` (the instances of one service).

    The label is the id lowercased with everything outside [a-z0-9-] turned into '-'
    ('10.0.0.1:9000' -> '10-0-0-1-9000'). Ids that map to the same label get a short hash of
    the id appended, except one whose id *is* that label, which keeps it. The result depends
    only on the set of ids, never on their order, so every replica names instances alike;
    an instance's label changes only when a colliding id joins or leaves the service."""
    groups: dict[str, list[str]] = {}
    for iid in sorted(set(instance_ids)):
        groups.setdefault(_base_label(iid), []).append(iid)
    taken = set(groups)  # plain labels are never handed out as hashed ones
    out: dict[str, str] = {}
    for base, ids in groups.items():
        for iid in ids:
            if len(ids) == 1 or iid == base:
                out[iid] = base
            else:
                out[iid] = _hashed_label(base, iid, taken)
    return out


def _hashed_label(base: str, instance_id: str, taken: set[str]) -> str:
    digest = hashlib.sha256(instance_id.encode()).hexdigest()
    # Longer hashes only on a hash collision (never in practice); then a counter.
    for n in (8, 16, 32):
        label = f"{base[: 62 - n].rstrip('-')}-{digest[:n]}"
        if label not in taken:
            taken.add(label)
            return label
    k = 2
    while (label := f"{base[:40].rstrip('-')}-{digest[:8]}-{k}") in taken:
        k += 1
    taken.add(label)
    return label


# --- the zone, indexed from one snapshot ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Member:
    instance: Instance
    label: bytes  # this instance's label under its service
    port: int
    ip: IP | None  # None: the address is a host name
    host: Name  # the host name's labels (hostname instances only)


@dataclass(frozen=True, slots=True)
class _Service:
    name: bytes
    members: tuple[_Member, ...]  # every registered instance, serving or not
    by_label: dict[bytes, _Member]

    def serving(self) -> list[_Member]:
        return [m for m in self.members if m.instance.serving]


class _Zone:
    """What one snapshot looks like as DNS names. Built once per snapshot (the snapshot is
    immutable), so a query costs a dict lookup, not a pass over the catalog."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.serial = snapshot.version % 2**32
        grouped: dict[bytes, list[Instance]] = {}
        for service, instances in snapshot.services().items():
            # Services come from the registry as DNS labels already; anything else (a
            # snapshot built by hand) cannot be one name in the zone, so it is left out.
            lowered = service.lower()
            if is_dns_label(lowered):
                grouped.setdefault(lowered.encode(), []).extend(instances)
        self.services: dict[bytes, _Service] = {}
        for name, instances in grouped.items():
            labels = instance_labels(i.instance_id for i in instances)
            members = tuple(m for m in (_member(i, labels[i.instance_id]) for i in instances) if m)
            by_label = {m.label: m for m in members}
            self.services[name] = _Service(name, members, by_label)


def _member(inst: Instance, label: str) -> _Member | None:
    try:
        host, port = parse_host_port(inst.address)
    except ValueError:
        # The registry checks addresses; a bad one here came from elsewhere. Skipping it
        # beats failing every query for the whole zone.
        log.warning(
            "dns: skipping %s/%s: bad address %r", inst.service, inst.instance_id, inst.address
        )
        return None
    try:
        ip: IP | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    names: Name = ()
    if ip is None:
        names = tuple(host.rstrip(".").encode().split(b"."))
        if any(not 1 <= len(x) <= 63 for x in names) or len(host) > 253:
            log.warning(
                "dns: skipping %s/%s: %r is not a DNS name", inst.service, inst.instance_id, host
            )
            return None
    return _Member(inst, label.encode(), port, ip, names)


# --- the server ----------------------------------------------------------------------------


class DnsServer:
    """An authoritative DNS server for `domain`, answering from `snapshot()`."""

    def __init__(
        self, snapshot: Callable[[], Snapshot], domain: str = "mesh.local", ttl: int = 5
    ) -> None:
        labels = tuple(domain.lower().rstrip(".").encode().split(b"."))
        if not domain.rstrip(".") or any(not 1 <= len(x) <= 63 for x in labels):
            raise ValueError(f"dns domain: {domain!r} is not a domain name, e.g. mesh.local")
        if not 0 <= ttl < 2**31:
            raise ValueError(f"dns ttl: {ttl} is outside 0..2147483647 seconds")
        self._snapshot = snapshot
        self.domain: Name = labels
        self.ttl = ttl
        self.tcp_idle_timeout = TCP_IDLE_TIMEOUT
        self.port = 0
        self._zone: _Zone | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tcp_tasks: set[asyncio.Task[None]] = set()

    # --- answers (pure) ---

    def answer(self, query: bytes, *, udp: bool = False) -> bytes:
        """One DNS message in, the reply out; b"" when nothing should be sent (the bytes
        are not even a DNS header, or they are a response rather than a query).

        `udp=True` limits the reply to what the client can take over UDP (512 bytes, or its
        EDNS payload size up to 1232): extra records go first, then the reply is sent
        truncated (TC) so the client retries over TCP."""
        try:
            request = DNSRecord.parse(query)
        except Exception:  # dnslib raises more than DNSError on some garbage (label loops)
            return _format_error(query)
        if request.header.qr:
            return b""  # never answer a response: two servers would ping-pong forever
        reply, limit = self._reply(request)
        if not udp:
            limit = TCP_MAX_SIZE
        return _fit(reply, limit)

    def _reply(self, request: DNSRecord) -> tuple[DNSRecord, int]:
        header = request.header
        reply = DNSRecord(
            DNSHeader(
                id=header.id, bitmap=0, qr=1, opcode=header.opcode, rd=header.rd, cd=header.cd
            )
        )
        opts = [r for r in request.ar if r.rtype == QTYPE.OPT]
        limit = UDP_PLAIN_SIZE
        if opts:
            # RFC 6891 6.1.1: a responder answers an EDNS query with an OPT record.
            limit = max(UDP_PLAIN_SIZE, min(opts[0].rclass, UDP_EDNS_SIZE))
            if len(opts) > 1:
                reply.header.rcode = RCODE.FORMERR
                return reply, limit
            version = (opts[0].ttl >> 16) & 0xFF
            reply.add_ar(EDNS0(udp_len=UDP_EDNS_SIZE, ext_rcode=_BADVERS >> 4 if version else 0))
            if version:
                return reply, limit
        if header.opcode != OPCODE.QUERY:
            reply.header.rcode = RCODE.NOTIMP
            return reply, limit
        if len(request.questions) != 1:
            reply.header.rcode = RCODE.FORMERR
            return reply, limit
        question = request.questions[0]
        reply.add_question(question)
        qname = tuple(x.lower() for x in question.qname.label)
        in_zone = (
            len(qname) >= len(self.domain) and qname[len(qname) - len(self.domain) :] == self.domain
        )
        if not in_zone or question.qclass not in (CLASS.IN, _CLASS_ANY):
            # Not ours: an authoritative-only server refuses rather than recurse.
            reply.header.rcode = RCODE.REFUSED
            return reply, limit
        try:
            zone = self._current_zone()
        except Exception:
            log.exception("dns: reading the catalog snapshot failed")
            reply.header.rcode = RCODE.SERVFAIL
            return reply, limit
        reply.header.aa = 1
        self._resolve(
            reply, question.qname, qname[: len(qname) - len(self.domain)], question.qtype, zone
        )
        return reply, limit

    def _current_zone(self) -> _Zone:
        snapshot = self._snapshot()
        # `is`, not ==: snapshots are immutable, so the same object means the same zone, and
        # comparing contents would cost what rebuilding costs.
        if self._zone is None or self._zone.snapshot is not snapshot:
            self._zone = _Zone(snapshot)
        return self._zone

    def _resolve(self, reply: DNSRecord, owner: Any, rel: Name, qtype: int, zone: _Zone) -> None:
        """Fills `reply` for the name `rel` (relative to the domain; `owner` is the name as
        asked, so answers echo the client's spelling)."""
        want_a = qtype in (QTYPE.A, QTYPE.ANY)
        want_aaaa = qtype in (QTYPE.AAAA, QTYPE.ANY)
        want_srv = qtype in (QTYPE.SRV, QTYPE.ANY)
        service = zone.services.get(rel[-1]) if rel else None

        if not rel:  # the apex
            if qtype in (QTYPE.SOA, QTYPE.ANY):
                reply.add_answer(self._soa(zone))
            if qtype in (QTYPE.NS, QTYPE.ANY):
                reply.add_answer(
                    RR(self._name(), QTYPE.NS, rdata=NS(self._name(b"ns")), ttl=self.ttl)
                )
        elif service is not None and len(rel) == 1:
            serving = service.serving()
            if want_srv:
                self._add_srv(reply, owner, service, serving)
            reply.add_answer(*self._addresses(owner, serving, want_a, want_aaaa))
        elif service is not None and rel[:-1] == _GRPC_TCP:
            if want_srv:
                self._add_srv(reply, owner, service, service.serving())
        elif service is not None and rel[:-1] == _GRPC_TCP[1:]:
            pass  # `_tcp.<service>` exists as the parent of `_grpc._tcp.<service>`: NODATA
        elif service is not None and len(rel) == 2 and rel[0] in service.by_label:
            member = service.by_label[rel[0]]
            if member.instance.serving:
                reply.add_answer(*self._addresses(owner, [member], want_a, want_aaaa))
        elif rel == (b"ns",):
            pass  # the NS record's target; we do not know our own public address: NODATA
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        if not reply.rr:
            # NXDOMAIN or NODATA: the SOA lets resolvers cache the negative answer (RFC 2308).
            reply.add_auth(self._soa(zone))

    def _add_srv(
        self, reply: DNSRecord, owner: Any, service: _Service, serving: list[_Member]
    ) -> None:
        for m in serving:
            if m.ip is None:
                target = DNSLabel(m.host)
            else:
                target = self._name(m.label, service.name)
                # The addresses of the targets ride along, saving a round trip per target.
                reply.add_ar(*self._addresses(target, [m], True, True))
            weight = min(max(m.instance.weight, 0), 65535)
            reply.add_answer(
                RR(
                    owner,
                    QTYPE.SRV,
                    ttl=self.ttl,
                    rdata=SRV(priority=0, weight=weight, port=m.port, target=target),
                )
            )

    def _addresses(self, owner: Any, members: Iterable[_Member], v4: bool, v6: bool) -> list[Any]:
        out: list[Any] = []
        for m in members:
            if v4 and isinstance(m.ip, ipaddress.IPv4Address):
                out.append(RR(owner, QTYPE.A, rdata=A(tuple(m.ip.packed)), ttl=self.ttl))
            elif v6 and isinstance(m.ip, ipaddress.IPv6Address):
                # `.packed` drops a scope id (fe80::1%eth0), which DNS cannot carry anyway.
                out.append(RR(owner, QTYPE.AAAA, rdata=AAAA(tuple(m.ip.packed)), ttl=self.ttl))
        return out

    def _soa(self, zone: _Zone) -> Any:
        times = (zone.serial, _SOA_REFRESH, _SOA_RETRY, _SOA_EXPIRE, self.ttl)
        soa = SOA(self._name(b"ns"), self._name(b"hostmaster"), times)
        return RR(self._name(), QTYPE.SOA, rdata=soa, ttl=self.ttl)

    def _name(self, *labels: bytes) -> Any:
        return DNSLabel(labels + self.domain)

    # --- transports ---

    async def start(self, listen: str) -> int:
        """Serves UDP and TCP on the same port of `listen` ("HOST:PORT"; port 0 picks one,
        which is then used for both); returns the port."""
        if self._udp is not None:
            raise RuntimeError("DnsServer already started")
        host, port = _parse_listen(listen)
        loop = asyncio.get_running_loop()
        # With port 0 the UDP port is picked first and TCP must get the same number, which
        # someone else may hold over TCP; then pick another. A fixed port gets one try.
        attempts = BIND_ATTEMPTS if port == 0 else 1
        for attempt in range(attempts):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(host, port)
            )
            sockname = udp.get_extra_info("sockname")
            bound_host, bound_port = str(sockname[0]), int(sockname[1])
            try:
                # The address UDP actually bound, so a name like `localhost` cannot send the
                # two transports to different addresses.
                self._tcp = await asyncio.start_server(self._serve_tcp, bound_host, bound_port)
            except OSError:
                udp.close()
                if attempt == attempts - 1:
                    raise
                continue
            self._udp = udp
            self.port = bound_port
            log.info(
                "dns: serving %s on %s port %d (udp+tcp)",
                b".".join(self.domain).decode(),
                bound_host,
                bound_port,
            )
            return bound_port
        raise AssertionError("unreachable")

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            # Idle keep-alive connections would otherwise linger until their timeout.
            tasks = list(self._tcp_tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._tcp.wait_closed()
            self._tcp = None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._tcp_tasks) >= MAX_TCP_CONNECTIONS:
            writer.close()
            return
        self._tcp_tasks.add(task)
        try:
            # RFC 7766: several queries per connection, each with a 2-byte length prefix.
            while True:
                try:
                    # The timeout covers reading the whole query, so a client trickling
                    # bytes cannot hold the connection open forever either.
                    async with asyncio.timeout(self.tcp_idle_timeout):
                        size = int.from_bytes(await reader.readexactly(2), "big")
                        query = await reader.readexactly(size)
                except (TimeoutError, asyncio.IncompleteReadError):
                    return
                reply = self.answer(query)
                if not reply:
                    return  # not DNS: nothing sensible to say on this stream any more
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self._tcp_tasks.discard(task)
            writer.close()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self._server = server
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:  # type: ignore[override]
        self._transport = transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        reply = self._server.answer(data, udp=True)
        if reply and self._transport is not None:
            self._transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP "port unreachable" from a client that left; each datagram stands alone.
        log.debug("dns: udp error: %s", exc)


# --- helpers -------------------------------------------------------------------------------


def _format_error(query: bytes) -> bytes:
    """FORMERR for a message whose header parses but whose body does not; b"" otherwise
    (without an id there is no one to reply to)."""
    if len(query) < 12:
        return b""
    try:
        header = DNSHeader.parse(DNSBuffer(query[:12]))
    except Exception:
        return b""
    if header.qr:
        return b""
    reply = DNSHeader(
        id=header.id, bitmap=0, qr=1, opcode=header.opcode, rd=header.rd, rcode=RCODE.FORMERR
    )
    return bytes(DNSRecord(reply).pack())


def _fit(reply: DNSRecord, limit: int) -> bytes:
    """Packs `reply` into at most `limit` bytes: first without the additional records
    (optional by definition, RFC 2181 9), then as an empty truncated reply (TC), which
    tells the client to ask again over TCP."""
    data = bytes(reply.pack())
    if len(data) <= limit:
        return data
    reply.ar = [r for r in reply.ar if r.rtype == QTYPE.OPT]
    data = bytes(reply.pack())
    if len(data) <= limit:
        return data
    reply.rr, reply.auth = [], []
    reply.header.tc = 1
    return bytes(reply.pack())


def _parse_listen(listen: str) -> tuple[str, int]:
    # Not parse_host_port: that one rejects port 0, which here means "pick one".
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"dns listen: {listen!r} is not HOST:PORT, e.g. 0.0.0.0:8053")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)
