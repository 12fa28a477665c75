"""GossipService on real UDP sockets (127.0.0.1 only) with real Ed25519."""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import pytest
from nacl.signing import SigningKey

from gossip import Event, EventKind, GossipConfig, LocalProtocolError, MemberState
from gossip.auth import DatagramOpener, DatagramSealer, issue_cert
from gossip.messages import Ping, encode_packet
from gossip.udp import GossipService, Kind, address_from_meta_default, address_meta

CONFIG = GossipConfig.local()
ANCHOR = SigningKey.generate()
ANCHOR_HEX = bytes(ANCHOR.verify_key).hex()
ROGUE_ANCHOR = SigningKey.generate()


def sealer(member_id: str, anchor: SigningKey = ANCHOR) -> DatagramSealer:
    key = SigningKey.generate()
    cert = issue_cert(anchor, member_id, bytes(key.verify_key), time.time() + 3600)
    return DatagramSealer(member_id, key, cert)


def service(member_id: str, anchor: SigningKey = ANCHOR, **kw: object) -> GossipService:
    opener = DatagramOpener(lambda: [ANCHOR_HEX], recipient=member_id)
    return GossipService(CONFIG, sealer(member_id, anchor), opener, **kw)  # type: ignore[arg-type]


async def until(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait for ``pred`` to hold, re-checking every 10 ms; fail after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while not pred():  # noqa: ASYNC110 - polls counters and views that no event announces
            await asyncio.sleep(0.01)


def alive_ids(svc: GossipService) -> set[str]:
    return {m for m, v in svc.node.members().items() if v.state == MemberState.ALIVE}


def state_of(svc: GossipService, member_id: str) -> MemberState | None:
    v = svc.node.member(member_id)
    return None if v is None else v.state


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


async def cluster(stack: AsyncExitStack, n: int, **kw: object) -> list[GossipService]:
    """``n`` services joined through the first one's address (under the id "seed")."""
    svcs = [await stack.enter_async_context(service(f"m{k}", ANCHOR, **kw)) for k in range(n)]
    for s in svcs[1:]:
        s.set_addresses({"seed": svcs[0].address})
        s.join(["seed"])
    ids = {s.member_id for s in svcs}
    await until(lambda: all(alive_ids(s) == ids for s in svcs))
    return svcs


class Raw:
    """A plain UDP socket on loopback, for sending crafted datagrams."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sock.sendto(data, addr)

    def recv(self) -> bytes | None:
        try:
            return self.sock.recv(70_000)
        except BlockingIOError:
            return None

    def close(self) -> None:
        self.sock.close()


# -- tests --------------------------------------------------------------------------


async def test_start_stop_single_service_leaves_no_task() -> None:
    svc = service("solo", port=0)
    with pytest.raises(LocalProtocolError):
        _ = svc.node
    async with svc:
        host, port = svc.address
        assert host == "127.0.0.1" and port > 0
        assert svc.running
        assert svc.publish(b"v1") == 1
    assert not svc.running
    assert svc.node.left
    assert asyncio.all_tasks() == {asyncio.current_task()}
    with pytest.raises(LocalProtocolError):
        await svc.start()
    await svc.stop()  # idempotent


async def test_membership_forms_summary_reaches_all_and_crash_is_detected(
    stack: AsyncExitStack,
) -> None:
    events: list[Event] = []
    svcs = await cluster(stack, 5)
    for s in svcs:
        s.on_events = events.extend
    # Every address was learnt from authenticated traffic.
    for s in svcs:
        for o in svcs:
            if o is not s:
                assert s.address_of(o.member_id) == o.address

    svcs[3].publish(b"site m3 is fine")
    await until(
        lambda: all(
            s.node.member("m3").summary == b"site m3 is fine"  # type: ignore[union-attr]
            for s in svcs
        ),
        5.0,
    )
    assert any(e.kind == EventKind.SUMMARY and e.value == b"site m3 is fine" for e in events)

    # m4 crashes (no leave): everyone else declares it dead.
    svcs[4].abort()
    await until(lambda: all(state_of(s, "m4") == MemberState.DEAD for s in svcs[:4]), 10.0)
    assert any(e.kind == EventKind.DEAD and e.member_id == "m4" for e in events)
    assert all(alive_ids(s) == {"m0", "m1", "m2", "m3"} for s in svcs[:4])

    # m2 stops cleanly: it leaves, and the others see it leave quickly.
    await svcs[2].stop()
    await until(lambda: all(state_of(s, "m2") == MemberState.LEFT for s in svcs[:2]), 3.0)
    for s in svcs:
        assert s.stats.dropped_total() == 0
        assert s.stats.callback_errors == 0


async def test_hostile_datagrams_change_nothing_and_are_counted(stack: AsyncExitStack) -> None:
    a, b = await cluster(stack, 2)
    received: list[tuple[str, bytes]] = []
    a.on_app_message = lambda sender, body: received.append((sender, body))
    raw = Raw()
    try:
        before_members = dict(a.node.members())

        # Garbage, and a datagram over the size limit.
        raw.send(b"hello there", a.address)
        raw.send(b"\x9bG\x01\x01" + bytes(300), a.address)
        raw.send(bytes(10_000), a.address)
        # A member certified by an anchor A does not trust.
        eve = sealer("eve", ROGUE_ANCHOR)
        raw.send(eve.seal(bytes([Kind.GOSSIP]) + b"\x01\x08", time.time(), "m0"), a.address)
        # B's id, with B's (valid, public) certificate, signed by someone else.
        forger = sealer("forger")
        b_cert = b._sealer.cert.raw
        good = forger.seal(bytes([Kind.APP]) + b"from b, honest", time.time(), "m0")
        body = good[4 + len(forger.cert.raw) : -64]
        head = b"\x9bG\x01\x01" + b_cert + body
        sig = forger._key.sign(b"gossip datagram v1\x00m0\x00" + head).signature
        raw.send(head + sig, a.address)
        # A legitimate member's app message, then the same datagram replayed.
        carol = sealer("carol")
        app = carol.seal(bytes([Kind.APP]) + b"once", time.time(), "m0")
        raw.send(app, a.address)
        raw.send(app, a.address)
        # A legitimate ping, replayed: answered once.
        ping = carol.seal(bytes([Kind.GOSSIP]) + encode_packet([Ping(77, "m0")]), time.time(), "m0")
        raw.send(ping, a.address)
        raw.send(ping, a.address)
        # A datagram for someone else, replayed to A.
        to_b = carol.seal(bytes([Kind.APP]) + b"for b", time.time(), "m1")
        raw.send(to_b, a.address)
        # Stale: sealed with a clock two minutes behind.
        dave = sealer("dave")
        raw.send(dave.seal(bytes([Kind.APP]) + b"old", time.time() - 120, "m0"), a.address)
        # An app message that is not bound to its recipient.
        raw.send(carol.seal(bytes([Kind.APP]) + b"unbound", time.time()), a.address)

        expected = {
            "malformed": 3,
            "oversized": 1,
            "bad_cert": 1,
            "bad_signature": 2,
            "replayed": 2,
            "stale": 1,
        }
        await until(lambda: a.stats.dropped == expected, 5.0)
        assert received == [("carol", b"once")]
        # The ping was answered, once, to the address it came from.
        replies: list[bytes] = []

        def got_reply() -> bool:
            data = raw.recv()
            if data is not None:
                replies.append(data)
            return bool(replies)

        await until(got_reply, 2.0)
        await asyncio.sleep(0.05)  # let a second answer arrive, if there were one
        assert raw.recv() is None and len(replies) == 1
        assert a.stats.app_in == 1 and a.stats.punches_in == 0
        # Membership unchanged: no eve, no carol, B still B at its own address.
        assert set(a.node.members()) == set(before_members)
        assert a.address_of("m1") == b.address
        assert state_of(a, "m1") == MemberState.ALIVE
    finally:
        raw.close()


async def test_app_messages_round_trip(stack: AsyncExitStack) -> None:
    a, b = await cluster(stack, 2)
    got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    def answer(sender: str, body: bytes) -> None:
        b.send_app(sender, b"re:" + body)

    b.on_app_message = answer
    a.on_app_message = lambda sender, body: got.put_nowait((sender, body))
    for k in range(20):
        assert a.send_app("m1", f"request {k}".encode())
    replies = [await asyncio.wait_for(got.get(), 5.0) for _ in range(20)]
    assert sorted(replies) == sorted(("m1", f"re:request {k}".encode()) for k in range(20))
    assert a.stats.app_out == 20 and b.stats.app_in == 20 and a.stats.app_in == 20
    # Size-bounded; and nowhere to send to an unknown id.
    big = bytes(a.max_app_bytes - 3)
    assert a.send_app("m1", big)
    assert await asyncio.wait_for(got.get(), 5.0) == ("m1", b"re:" + big)
    with pytest.raises(LocalProtocolError):
        a.send_app("m1", bytes(a.max_app_bytes + 1))
    assert not a.send_app("nobody", b"x")
    assert a.stats.no_address == 1


async def test_untrusted_anchor_member_is_never_admitted(stack: AsyncExitStack) -> None:
    svcs = await cluster(stack, 3)
    eve = await stack.enter_async_context(service("eve", anchor=ROGUE_ANCHOR))
    eve.set_addresses({"seed": svcs[0].address, "m1": svcs[1].address})
    eve.join(["seed"])
    eve.send_app("m1", b"let me in")
    eve.punch(["m1"])
    # Join retries keep coming and keep being refused.
    await until(lambda: svcs[0].stats.dropped["bad_cert"] >= 3, 5.0)
    assert svcs[1].stats.dropped["bad_cert"] >= 2
    assert svcs[1].stats.app_in == 0 and svcs[1].stats.punches_in == 0
    for s in svcs:
        assert "eve" not in s.node.members()
        assert s.address_of("eve") is None
        assert alive_ids(s) == {"m0", "m1", "m2"}


async def test_punch_records_address_and_counts_as_contact(stack: AsyncExitStack) -> None:
    # A relay (the hub) and two NATed members; loopback has no NAT, but the
    # cores behave as if: they only address each other through the relay.
    hub = await stack.enter_async_context(service("hub", relay=True))
    x = await stack.enter_async_context(service("x", natted=True))
    y = await stack.enter_async_context(service("y", natted=True))
    for s in (x, y):
        s.set_addresses({"hub": hub.address})
        s.join(["hub"])
    await until(lambda: all(alive_ids(s) == {"hub", "x", "y"} for s in (hub, x, y)))
    # x learns y's address from the hub (out of band here) and punches.
    x.set_addresses({"y": y.address})
    heard_before = y.node._heard.get("x", -1.0)
    assert x.punch(["y", "unknown"]) == 1
    await until(lambda: y.stats.punches_in == 1, 2.0)
    assert y.address_of("x") == x.address
    # The core of y counts it as hearing from x (it may now address x directly).
    assert y.node._heard["x"] > heard_before
    assert y.stats.dropped_total() == 0


async def test_stop_disseminates_the_leave(stack: AsyncExitStack) -> None:
    svcs = await cluster(stack, 3)
    t0 = asyncio.get_running_loop().time()
    await svcs[1].stop()
    assert asyncio.get_running_loop().time() - t0 < 1.5
    assert svcs[1].node.pending_broadcasts() == 0
    await until(lambda: all(state_of(s, "m1") == MemberState.LEFT for s in (svcs[0], svcs[2])), 3.0)


def test_address_meta_round_trip_and_garbage() -> None:
    for addr in [("127.0.0.1", 7946), ("::1", 1), ("2001:db8::7", 65535)]:
        assert address_from_meta_default(address_meta(addr)) == addr
    for meta in [b"", b"\xff", b"host:1", b"1.2.3.4", b"1.2.3.4:0", b"1.2.3.4:99999", b"{}"]:
        assert address_from_meta_default(meta) is None
    with pytest.raises(ValueError):
        address_meta(("example.com", 1))


async def test_constructor_and_address_book_checks() -> None:
    opener = DatagramOpener(lambda: [ANCHOR_HEX], recipient="someone-else")
    with pytest.raises(LocalProtocolError, match="someone-else"):
        GossipService(CONFIG, sealer("m0"), opener)
    svc = service("m0")
    with pytest.raises(ValueError):
        svc.set_addresses({"seed": ("example.com", 7946)})  # names would block the loop
    with pytest.raises(ValueError):
        svc.set_addresses({"seed": ("127.0.0.1", 0)})
    svc.set_addresses({"seed": ("127.0.0.1", 9)})
    assert svc.address_of("seed") == ("127.0.0.1", 9)
    svc.set_addresses({"other": ("::1", 9)}, replace=True)
    assert svc.address_of("seed") is None
    with pytest.raises(LocalProtocolError):
        svc.send_app("other", b"not started")


async def test_callback_errors_are_contained(stack: AsyncExitStack) -> None:
    a, b = await cluster(stack, 2)

    def broken(*_: object) -> None:
        raise RuntimeError("owner bug")

    b.on_app_message = broken
    b.on_events = broken
    a.send_app("m1", b"x")
    a.publish(b"summary")
    await until(lambda: b.stats.callback_errors >= 2, 3.0)
    # Still serving.
    got: list[bytes] = []
    b.on_app_message = lambda _sender, body: got.append(body)
    a.send_app("m1", b"y")
    await until(lambda: got == [b"y"], 3.0)


async def test_drop_warnings_are_rate_limited(
    stack: AsyncExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    svc = await stack.enter_async_context(service("m0", warn_interval_s=60.0))
    raw = Raw()
    try:
        with caplog.at_level(logging.DEBUG, logger="gossip.udp"):
            for _ in range(50):
                raw.send(b"junk", svc.address)
            await until(lambda: svc.stats.dropped["malformed"] == 50, 3.0)
    finally:
        raw.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "dropped" in r.message]
    assert len(warnings) == 1 and len(debug) == 50


def test_the_timer_re_arms_on_uvloop_when_a_deadline_is_already_past(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvloop answers ``call_at`` with a time already past with a plain ``Handle`` (no
    ``when()``); re-arming the service's timer over such a handle used to raise
    AttributeError (a busy loop makes the node's deadline pass before it is armed)."""
    import uvloop

    async def run() -> None:
        loop = asyncio.get_running_loop()
        async with AsyncExitStack() as stack:
            a, b = await cluster(stack, 2)
            monkeypatch.setattr(a.node, "next_deadline", lambda: loop.time() - 1.0)
            a._last_tick = -math.inf
            a._arm()
            assert not hasattr(a._timer, "when")  # the premise: uvloop's plain Handle
            a._arm()  # re-armed before it ran
            monkeypatch.undo()
            a.publish(b"after")

            def seen() -> bool:
                view = b.node.member(a.member_id)
                return view is not None and view.summary == b"after"

            await until(seen)  # the service still works

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run())
