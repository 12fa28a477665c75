import random

import pytest

from gossip.errors import (
    MalformedPacketError,
    OversizedPacketError,
    RemoteProtocolError,
    TruncatedPacketError,
    UnsupportedVersionError,
)
from gossip.messages import (
    VERSION,
    Ack,
    Alive,
    Dead,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    StateEntry,
    Summary,
    Suspect,
    Sync,
    decode_packet,
    encode_message,
    encode_packet,
    pack,
)


def samples() -> list[Message]:
    return [
        Ping(0, "a"),
        Ping(0xFFFFFFFF, "é" * 100),
        PingReq(7, "site-17"),
        Ack(1),
        Nack(2),
        Alive("hub", 0xFFFFFFFF, 0x03, b"10.0.0.1:7946"),
        Alive("x" * 255, 0, 0, b""),
        Suspect("m1", 5, "m2"),
        Dead("m1", 6, "m1"),
        Summary("site-3", 2**64 - 1, b"\x00\xff" * 100),
        Summary("site-3", 1, b""),
        Sync(9, 2**64 - 1),
        PushPull(
            3,
            True,
            False,
            0,
            2,
            (
                StateEntry("a", 1, 0, 1, b"meta", 4, b"v"),
                StateEntry("b", 0, 3, 0, b"", 0, b""),
            ),
        ),
        PushPull(4, False, True, 1, 2, ()),
    ]


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_single_message_round_trip(msg: Message) -> None:
    data = encode_packet([msg])
    assert data[0] == VERSION
    assert decode_packet(data) == [msg]


def test_compound_round_trip() -> None:
    msgs = samples()
    assert decode_packet(encode_packet(msgs)) == msgs


def test_encoder_rejects_out_of_range_values() -> None:
    with pytest.raises(ValueError):
        encode_message(Ping(2**32, "a"))
    with pytest.raises(ValueError):
        encode_message(Alive("", 0, 0, b""))
    with pytest.raises(ValueError):
        encode_message(Alive("x" * 256, 0, 0, b""))
    with pytest.raises(ValueError):
        encode_message(Summary("a", -1, b""))
    with pytest.raises(ValueError):
        pack([b"\x03\x00\x00\x00\x01"] * 256)


def test_every_truncation_is_a_remote_error() -> None:
    data = encode_packet(samples())
    for cut in range(len(data)):
        with pytest.raises((TruncatedPacketError, MalformedPacketError)):
            decode_packet(data[:cut])
    for msg in samples():
        one = encode_packet([msg])
        for cut in range(len(one)):
            with pytest.raises(RemoteProtocolError):
                decode_packet(one[:cut])


def test_specific_errors() -> None:
    good = encode_packet([Ack(1)])
    with pytest.raises(UnsupportedVersionError):
        decode_packet(b"\x02" + good[1:])
    with pytest.raises(TruncatedPacketError):
        decode_packet(b"")
    with pytest.raises(MalformedPacketError):
        decode_packet(good + b"\x00")  # trailing byte
    with pytest.raises(MalformedPacketError):
        decode_packet(bytes([VERSION, 99]))  # unknown type
    with pytest.raises(MalformedPacketError):
        decode_packet(bytes([VERSION, 10, 0]))  # empty compound
    nested = pack([encode_message(Ack(1)), bytes([10, 1, 0, 5]) + encode_message(Ack(2))])
    with pytest.raises(MalformedPacketError):
        decode_packet(nested)
    with pytest.raises(MalformedPacketError):
        decode_packet(encode_packet([Ping(1, "ab")]).replace(b"ab", b"\xff\xfe"))  # not UTF-8
    with pytest.raises(OversizedPacketError):
        decode_packet(bytes([VERSION]) + bytes(70_000))
    bad_state = encode_packet(
        [PushPull(1, False, False, 0, 1, (StateEntry("a", 1, 0, 0, b"", 0, b""),))]
    )
    at = len(bad_state) - 20 + 4  # the entry's state byte (19-byte header, 1-byte id)
    assert decode_packet(bad_state)
    with pytest.raises(MalformedPacketError):
        decode_packet(bad_state[:at] + b"\x09" + bad_state[at + 1 :])  # state 9
    with pytest.raises(MalformedPacketError):
        decode_packet(encode_packet([PushPull(1, False, False, 2, 2, ())]))  # part >= parts


def test_fuzzed_mutations_raise_only_remote_errors() -> None:
    rng = random.Random(1234)
    seeds = [encode_packet([m]) for m in samples()] + [encode_packet(samples())]
    decoded_ok = failed = 0
    for _ in range(5000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(data))
            if op < 0.5:
                data[pos] = rng.randrange(256)
            elif op < 0.7:
                del data[pos:]
            elif op < 0.85:
                data.insert(pos, rng.randrange(256))
            else:
                del data[pos]
            if not data:
                break
        try:
            decode_packet(bytes(data))
            decoded_ok += 1
        except RemoteProtocolError:
            failed += 1
    # Both outcomes happen; nothing else (no IndexError, struct.error, UnicodeError...).
    assert decoded_ok > 100 and failed > 1000


def test_random_garbage_is_rejected() -> None:
    rng = random.Random(99)
    for _ in range(3000):
        data = rng.randbytes(rng.randrange(0, 200))
        try:
            decode_packet(data)
        except RemoteProtocolError:
            continue
        assert data[0] == VERSION  # only a correct version byte can ever decode
