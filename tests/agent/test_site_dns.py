"""The site DNS server on real sockets (127.0.0.1, picked ports), asked by dnspython."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from meshorch.errors import ConfigurationError
from meshorch.net.dns import SiteDns, upstream_from_resolv_conf
from meshorch.net.dns_core import Answer, Drop, Forward, handle, upstream_reply_ok

ZONE = "site.meshorch"
WEB = "web.shop.acme.site.meshorch"


class Services:
    """A resolver backed by a dict, recording what it was asked."""

    def __init__(self) -> None:
        self.ready: dict[tuple[str, str, str], list[str]] = {
            ("web", "shop", "acme"): ["10.1.0.1", "10.1.0.2", "10.1.0.3"],
            ("db", "shop", "acme"): [],
        }
        self.calls: list[tuple[str, str, str]] = []
        self.fail = False

    def __call__(self, service: str, app: str, tenant: str) -> list[str] | None:
        self.calls.append((service, app, tenant))
        if self.fail:
            raise RuntimeError("the site state is not loaded")
        return self.ready.get((service, app, tenant))


@pytest.fixture
def services() -> Services:
    return Services()


@pytest.fixture
async def server(services: Services) -> AsyncIterator[SiteDns]:
    async with SiteDns(services, host="127.0.0.1", port=0) as dns_server:
        yield dns_server


async def ask(
    server: SiteDns, name: str, rdtype: str = "A", *, tcp: bool = False, **kw: Any
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **kw)
    if tcp:
        return await dns.asyncquery.tcp(query, server.host, port=server.port, timeout=3)
    return await dns.asyncquery.udp(query, server.host, port=server.port, timeout=3)


def addresses(response: dns.message.Message) -> set[str]:
    return {rd.to_text() for rrset in response.answer for rd in rrset}


def accounted(server: SiteDns) -> int:
    s = server.stats
    return (
        sum(s[k] for k in ("answered", "nxdomain", "malformed", "refused", "servfail"))
        + s["forwarded"]
    )


# -- answers from the zone ------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True])
async def test_a_record_with_every_ready_address(server: SiteDns, tcp: bool) -> None:
    response = await ask(server, WEB, tcp=tcp)
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert addresses(response) == {"10.1.0.1", "10.1.0.2", "10.1.0.3"}
    assert [rrset.ttl for rrset in response.answer] == [1]
    assert server.stats["answered"] == 1 and server.stats["queries"] == 1


async def test_names_are_case_insensitive(server: SiteDns, services: Services) -> None:
    response = await ask(server, "WeB.ShOP.Acme.SITE.MeshOrch")
    assert addresses(response) == {"10.1.0.1", "10.1.0.2", "10.1.0.3"}
    assert services.calls == [("web", "shop", "acme")]


async def test_no_ready_instance_is_an_empty_answer(server: SiteDns) -> None:
    response = await ask(server, "db.shop.acme.site.meshorch")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer == []
    assert response.authority[0].rdtype == dns.rdatatype.SOA


async def test_other_types_of_an_existing_name_are_empty(server: SiteDns) -> None:
    for rdtype in ("AAAA", "MX", "TXT"):
        response = await ask(server, WEB, rdtype)
        assert response.rcode() == dns.rcode.NOERROR and response.answer == []


@pytest.mark.parametrize(
    "name",
    [
        "nope.shop.acme.site.meshorch",  # resolve -> None
        "shop.acme.site.meshorch",  # two labels
        "acme.site.meshorch",
        "x.web.shop.acme.site.meshorch",  # four labels
        "we_b.shop.acme.site.meshorch",
        "-web.shop.acme.site.meshorch",
        "web-.shop.acme.site.meshorch",
        "w\\195\\169b.shop.acme.site.meshorch",  # a non-ASCII byte
    ],
)
async def test_unknown_and_malformed_names_are_nxdomain(
    server: SiteDns, services: Services, name: str
) -> None:
    response = await ask(server, name)
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.flags & dns.flags.AA
    soa = response.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA and soa[0].minimum == 1
    assert server.stats["nxdomain"] == 1
    if not name.startswith("nope."):
        assert services.calls == []  # malformed names never reach the resolver


async def test_zone_apex_has_an_soa(server: SiteDns) -> None:
    response = await ask(server, "SITE.meshorch", "SOA")
    assert response.rcode() == dns.rcode.NOERROR
    assert response.answer[0].rdtype == dns.rdatatype.SOA
    response = await ask(server, ZONE, "A")
    assert response.rcode() == dns.rcode.NOERROR and response.answer == []


async def test_changes_are_visible_on_the_next_query(server: SiteDns, services: Services) -> None:
    assert addresses(await ask(server, WEB)) == {"10.1.0.1", "10.1.0.2", "10.1.0.3"}
    services.ready[("web", "shop", "acme")] = ["10.1.0.9"]
    assert addresses(await ask(server, WEB)) == {"10.1.0.9"}
    services.ready[("web", "shop", "acme")] = []
    response = await ask(server, WEB)
    assert response.rcode() == dns.rcode.NOERROR and response.answer == []
    del services.ready[("web", "shop", "acme")]
    assert (await ask(server, WEB)).rcode() == dns.rcode.NXDOMAIN


async def test_resolver_failure_is_servfail(server: SiteDns, services: Services) -> None:
    services.fail = True
    response = await ask(server, WEB)
    assert response.rcode() == dns.rcode.SERVFAIL
    assert server.stats["servfail"] == 1
    services.fail = False
    assert addresses(await ask(server, WEB)) == {"10.1.0.1", "10.1.0.2", "10.1.0.3"}


async def test_resolver_returning_a_bad_address_is_servfail(
    server: SiteDns, services: Services
) -> None:
    services.ready[("web", "shop", "acme")] = ["10.1.0.1", "fd00::1"]
    assert (await ask(server, WEB)).rcode() == dns.rcode.SERVFAIL


async def test_long_answers_are_truncated_over_udp_and_whole_over_tcp(
    server: SiteDns, services: Services
) -> None:
    many = [f"10.2.{i // 250}.{i % 250 + 1}" for i in range(300)]
    services.ready[("web", "shop", "acme")] = many
    response = await ask(server, WEB)
    assert response.flags & dns.flags.TC and response.answer == []
    response = await ask(server, WEB, use_edns=0, payload=1232)
    assert response.flags & dns.flags.TC
    response = await ask(server, WEB, tcp=True)
    assert not response.flags & dns.flags.TC
    assert addresses(response) == set(many)
    few = many[:20]  # fits in 512 bytes
    services.ready[("web", "shop", "acme")] = few
    response = await ask(server, WEB)
    assert not response.flags & dns.flags.TC and addresses(response) == set(few)


async def test_answers_rotate_between_queries(server: SiteDns) -> None:
    firsts = set()
    for _ in range(30):
        response = await ask(server, WEB)
        firsts.add(response.answer[0][0].to_text())
    assert len(firsts) > 1


# -- names outside the zone ----------------------------------------------------------------


async def test_outside_the_zone_is_refused_without_upstream(server: SiteDns) -> None:
    response = await ask(server, "example.com")
    assert response.rcode() == dns.rcode.REFUSED
    assert not response.flags & dns.flags.RA
    assert server.stats["refused"] == 1


async def test_forwarding_to_an_upstream(services: Services) -> None:
    other = Services()
    other.ready = {("api", "crm", "beta"): ["192.0.2.7"]}
    async with SiteDns(other, host="127.0.0.1", port=0, zone="other.test") as upstream:
        dead = _unused_udp_port()
        async with SiteDns(
            services,
            host="127.0.0.1",
            port=0,
            upstream=[("127.0.0.1", dead), upstream.address],
        ) as server:
            for tcp in (False, True):
                response = await ask(server, "API.crm.beta.other.test", tcp=tcp)
                assert response.rcode() == dns.rcode.NOERROR
                assert addresses(response) == {"192.0.2.7"}
                response = await ask(server, "gone.crm.beta.other.test", tcp=tcp)
                assert response.rcode() == dns.rcode.NXDOMAIN
            # The zone is still answered locally, with recursion on offer.
            response = await ask(server, WEB)
            assert addresses(response) == {"10.1.0.1", "10.1.0.2", "10.1.0.3"}
            assert response.flags & dns.flags.RA
            assert server.stats["forwarded"] == 4
            assert server.stats["upstream_failed"] == 0
            assert upstream.stats["queries"] == 4


class _FakeUpstream(asyncio.DatagramProtocol):
    """Answers every query, after first sending a reply with the wrong id (ignored)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.ids: list[int] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        assert self.transport is not None
        query = dns.message.from_wire(data)
        self.ids.append(query.id)
        spoof = dns.message.make_response(query)
        spoof.id = (query.id + 1) % 65536
        spoof.answer.append(
            dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "203.0.113.66")
        )
        self.transport.sendto(spoof.to_wire(), addr)
        real = dns.message.make_response(query)
        real.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", "192.0.2.1"))
        self.transport.sendto(real.to_wire(), addr)


async def test_forwarding_keeps_the_id_and_ignores_other_replies(services: Services) -> None:
    loop = asyncio.get_running_loop()
    transport, fake = await loop.create_datagram_endpoint(
        _FakeUpstream, local_addr=("127.0.0.1", 0)
    )
    try:
        port = transport.get_extra_info("sockname")[1]
        async with SiteDns(
            services, host="127.0.0.1", port=0, upstream=[("127.0.0.1", port)]
        ) as server:
            query = dns.message.make_query("www.example.com", "A")
            response = await dns.asyncquery.udp(query, "127.0.0.1", port=server.port, timeout=3)
            assert response.id == query.id and fake.ids == [query.id]
            assert addresses(response) == {"192.0.2.1"}
    finally:
        transport.close()


@pytest.mark.parametrize("silent", [True, False])
async def test_upstream_down_is_servfail_within_the_timeout(
    services: Services, silent: bool
) -> None:
    # silent: a socket that reads and never answers; else a closed port (ICMP refused).
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blackhole.bind(("127.0.0.1", 0))
    port = blackhole.getsockname()[1] if silent else _unused_udp_port()
    try:
        async with SiteDns(
            services,
            host="127.0.0.1",
            port=0,
            upstream=[("127.0.0.1", port)],
            upstream_timeout_s=0.5,
        ) as server:
            for tcp in (False, True):
                started = time.monotonic()
                response = await ask(server, "www.example.com", tcp=tcp)
                elapsed = time.monotonic() - started
                assert response.rcode() == dns.rcode.SERVFAIL
                assert elapsed < 1.5
                if not silent:
                    assert elapsed < 0.4  # refused: no need to wait out the timeout
            assert server.stats["upstream_failed"] == 2
    finally:
        blackhole.close()


# -- TCP ------------------------------------------------------------------------------------


async def test_tcp_several_queries_on_one_connection(server: SiteDns) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        queries = [
            dns.message.make_query(name, "A")
            for name in (WEB, "db.shop.acme.site.meshorch", "nope.shop.acme.site.meshorch")
        ]
        # All three at once (pipelined): answered in order.
        writer.write(b"".join(q.to_wire(prepend_length=True) for q in queries))
        await writer.drain()
        rcodes = []
        for query in queries:
            size = int.from_bytes(await reader.readexactly(2), "big")
            response = dns.message.from_wire(await reader.readexactly(size))
            assert response.id == query.id
            rcodes.append(response.rcode())
        assert rcodes == [dns.rcode.NOERROR, dns.rcode.NOERROR, dns.rcode.NXDOMAIN]
    finally:
        writer.close()


async def test_tcp_idle_connections_are_closed(services: Services) -> None:
    async with SiteDns(services, host="127.0.0.1", port=0, tcp_idle_s=0.2) as server:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            async with asyncio.timeout(2):
                assert await reader.read() == b""
        finally:
            writer.close()


async def test_tcp_oversized_message_closes_the_connection(server: SiteDns) -> None:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(struct.pack(">H", 60000) + b"\0" * 100)
        await writer.drain()
        async with asyncio.timeout(2):
            assert await reader.read() == b""
    finally:
        writer.close()
    assert server.stats["malformed"] == 1
    assert addresses(await ask(server, WEB, tcp=True)) == {"10.1.0.1", "10.1.0.2", "10.1.0.3"}


# -- malformed input ------------------------------------------------------------------------


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(65535))
        except BlockingIOError:
            return out


def _mutations(rng: random.Random, count: int) -> list[bytes]:
    names = [WEB, "db.shop.acme.site.meshorch", "a.b.site.meshorch", "example.com", ZONE]
    options: list[dict[str, Any]] = [{}, {"use_edns": 0}, {"use_edns": 0, "payload": 4096}]
    seeds = [
        dns.message.make_query(
            rng.choice(names), rng.choice(["A", "AAAA", "ANY", "SOA"]), **kw
        ).to_wire()
        for kw in options
        for _ in range(10)
    ]
    out: list[bytes] = []
    for i in range(count):
        kind = i % 8
        base = bytearray(rng.choice(seeds))
        if kind == 0:  # noise of any length
            out.append(rng.randbytes(rng.randrange(0, 600)))
        elif kind == 1:  # truncated
            out.append(bytes(base[: rng.randrange(0, len(base))]))
        elif kind == 2:  # flipped bits
            for _ in range(rng.randrange(1, 8)):
                base[rng.randrange(len(base))] ^= 1 << rng.randrange(8)
            out.append(bytes(base))
        elif kind == 3:  # a response, another opcode, or several questions
            field = rng.choice(["qr", "opcode", "qdcount", "ancount"])
            if field == "qr":
                base[2] |= 0x80
            elif field == "opcode":
                base[2] = (base[2] & 0x87) | (rng.randrange(1, 16) << 3)
            else:
                offset = 4 if field == "qdcount" else 6
                base[offset : offset + 2] = struct.pack(">H", rng.randrange(2, 65536))
            out.append(bytes(base))
        elif kind == 4:  # random bytes after a valid header
            out.append(bytes(base[:12]) + rng.randbytes(rng.randrange(0, 300)))
        elif kind == 5:  # a compression pointer loop in the question
            out.append(bytes(base[:12]) + b"\xc0\x0c\x00\x01\x00\x01")
        elif kind == 6:  # huge
            out.append(bytes(base) + rng.randbytes(rng.randrange(4000, 9000)))
        else:  # overwritten bytes in the question or trailing garbage
            pos = rng.randrange(12, len(base))
            base[pos : pos + 4] = rng.randbytes(4)
            out.append(bytes(base) + rng.randbytes(rng.randrange(0, 3)))
    return out


async def _wait_for_queries(server: SiteDns, count: int) -> None:
    async with asyncio.timeout(10):
        while server.stats["queries"] < count:  # noqa: ASYNC110 - a counter no event announces
            await asyncio.sleep(0.005)


async def test_fuzzed_packets_never_break_the_server(server: SiteDns) -> None:
    rng = random.Random(20261128)
    packets = _mutations(rng, 5000)
    # A plain socket: asyncio's transports do not send empty datagrams.
    replies: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect((server.host, server.port))
        sent = 0
        for start in range(0, len(packets), 20):
            for packet in packets[start : start + 20]:
                sock.send(packet)
                sent += 1
            # Paced so that none is lost in a socket buffer: every one is counted.
            await _wait_for_queries(server, sent)
            replies.extend(_drain(sock))
        await asyncio.sleep(0.1)
        replies.extend(_drain(sock))
    stats = server.stats
    assert stats["queries"] == 5000
    assert accounted(server) == 5000
    assert stats["malformed"] > 1000
    assert len(replies) > 2000, "readable headers are answered"
    for reply in replies:
        assert len(reply) >= 12 and reply[2] & 0x80

    # Over TCP: garbage frames, one connection each (a bad frame may end it).
    before = stats["queries"]
    for packet in packets[:200]:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        try:
            writer.write(struct.pack(">H", len(packet) % 65536) + packet)
            writer.write_eof()
            async with asyncio.timeout(2):
                await reader.read()
        finally:
            writer.close()
    assert stats["queries"] - before >= 150  # empty packets send a zero length and count too
    assert accounted(server) == stats["queries"]

    for tcp in (False, True):
        response = await ask(server, WEB, tcp=tcp)
        assert addresses(response) == {"10.1.0.1", "10.1.0.2", "10.1.0.3"}


# -- the core without sockets ---------------------------------------------------------------


def _never(service: str, app: str, tenant: str) -> list[str] | None:
    raise AssertionError("the resolver must not be called")


def test_core_drops_what_has_no_header_and_responses() -> None:
    assert isinstance(handle(b"\x12\x34\x01", _never, ZONE, 1), Drop)
    response = dns.message.make_response(dns.message.make_query(WEB, "A")).to_wire()
    assert isinstance(handle(response, _never, ZONE, 1), Drop)


@pytest.mark.parametrize(
    ("patch", "rcode"),
    [
        (lambda w: w[:2] + bytes([w[2] | (4 << 3)]) + w[3:], dns.rcode.NOTIMP),  # NOTIFY
        (lambda w: w[:4] + b"\x00\x02" + w[6:], dns.rcode.FORMERR),  # two questions
        (lambda w: w[:4] + b"\x00\x00" + w[6:], dns.rcode.FORMERR),  # none
        (lambda w: w[:-3], dns.rcode.FORMERR),  # cut in the question
        (lambda w: w + b"\0" * 5000, dns.rcode.FORMERR),  # huge
    ],
)
def test_core_answers_bad_queries_from_the_header(patch: Any, rcode: dns.rcode.Rcode) -> None:
    query = dns.message.make_query(WEB, "A")
    reply = handle(patch(query.to_wire()), _never, ZONE, 1)
    assert isinstance(reply, Answer) and reply.outcome == "malformed"
    response = dns.message.from_wire(reply.wire)
    assert response.id == query.id and response.rcode() == rcode
    assert response.flags & dns.flags.QR and response.flags & dns.flags.RD


def test_core_badvers_for_an_unknown_edns_version() -> None:
    query = dns.message.make_query(WEB, "A", use_edns=1)
    reply = handle(query.to_wire(), _never, ZONE, 1)
    assert isinstance(reply, Answer)
    assert dns.message.from_wire(reply.wire).rcode() == dns.rcode.BADVERS


def test_core_forward_decision_and_upstream_check() -> None:
    query = dns.message.make_query("WWW.Example.com", "A")
    reply = handle(query.to_wire(), _never, ZONE, 1, forwarding=True)
    assert isinstance(reply, Forward) and reply.query == query.to_wire()
    assert dns.message.from_wire(reply.servfail).rcode() == dns.rcode.SERVFAIL
    good = dns.message.make_response(query)
    assert upstream_reply_ok(reply, good.to_wire())
    good.question[0].name = dns.name.from_text("www.EXAMPLE.com")
    assert upstream_reply_ok(reply, good.to_wire())  # case may differ
    other_id = dns.message.make_response(query)
    other_id.id ^= 1
    assert not upstream_reply_ok(reply, other_id.to_wire())
    assert not upstream_reply_ok(reply, query.to_wire())  # not a response
    other_type = dns.message.make_response(dns.message.make_query("www.example.com", "AAAA"))
    other_type.id = query.id
    assert not upstream_reply_ok(reply, other_type.to_wire())
    assert not upstream_reply_ok(reply, b"\x00")


def test_core_zone_is_configurable() -> None:
    def resolve(service: str, app: str, tenant: str) -> list[str] | None:
        return ["10.0.0.1"] if (service, app, tenant) == ("a", "b", "c") else None

    reply = handle(
        dns.message.make_query("A.b.c.Mesh.Internal", "A").to_wire(), resolve, "mesh.internal", 5
    )
    assert isinstance(reply, Answer) and reply.outcome == "answered"
    response = dns.message.from_wire(reply.wire)
    assert response.answer[0].ttl == 5
    reply = handle(dns.message.make_query(WEB, "A").to_wire(), resolve, "mesh.internal", 5)
    assert isinstance(reply, Answer) and reply.outcome == "refused"


# -- configuration --------------------------------------------------------------------------


def test_upstream_from_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# generated\n"
        "search example.org\n"
        "nameserver 10.9.0.1\n"
        "nameserver 10.0.0.53  # our own listener\n"
        "nameserver 2001:db8::1\n"
        "nameserver 10.9.0.1\n"
        "nameserver not-an-ip\n"
        "nameserver 127.0.0.53\n"
        "options edns0\n"
    )
    assert upstream_from_resolv_conf(conf, listen=("10.0.0.53", 53)) == [
        ("10.9.0.1", 53),
        ("2001:db8::1", 53),
        ("127.0.0.53", 53),
    ]
    # On a wildcard address port 53 we are every loopback resolver too.
    assert ("127.0.0.53", 53) not in upstream_from_resolv_conf(conf, listen=("0.0.0.0", 53))
    # Another port is not us.
    assert len(upstream_from_resolv_conf(conf, listen=("10.0.0.53", 5353))) == 4
    assert upstream_from_resolv_conf(tmp_path / "missing") == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"host": "localhost"},
        {"host": "127.0.0.1", "port": 70000},
        {"host": "127.0.0.1", "ttl_s": -1},
        {"host": "127.0.0.1", "zone": "bad..zone"},
        {"host": "127.0.0.1", "upstream": [("dns.example", 53)]},
        {"host": "127.0.0.1", "upstream_timeout_s": 0},
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        SiteDns(Services(), **kwargs)


def _unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
