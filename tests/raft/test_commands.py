import contextlib
import random

import pytest

from raft.commands import (
    Barrier,
    Batch,
    Delete,
    Guard,
    Put,
    decode_batch,
    encode_batch,
    encode_ops,
    join_encoded,
)
from raft.errors import CommandDecodeError


def sample_batch() -> Batch:
    return Batch(
        (
            Put("kv", b"a/b", b"\x00\xffvalue"),
            Put("kv", b"cas", b"x", expect_index=0),
            Put("sys", b"member/h1", b"{}", expect_index=42),
            Delete("kv", b"gone"),
            Barrier(),
            Guard("sys", b"fleet/trust", 17, 2),
        )
    )


def test_round_trip_keeps_every_field() -> None:
    batch = sample_batch()
    assert decode_batch(encode_batch(batch)) == batch


def test_empty_batch_round_trips() -> None:
    assert decode_batch(encode_batch(Batch(()))) == Batch(())


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "truncated"),
        (b"\x02\x00\x00\x00\x00", "unsupported command version 2"),
        (b"\x01\x00\x00\x00\x01\x09\x02kv\x00\x00", "unknown operation kind 9"),
        (b"\x01\x00\x00\x00\x00extra", "trailing bytes"),
        (b"\x01\x00\x00\x00\x01\x01\x02\xff\xfe\x00\x00", "not UTF-8"),
    ],
)
def test_malformed_payloads_are_rejected(payload: bytes, message: str) -> None:
    with pytest.raises(CommandDecodeError, match=message):
        decode_batch(payload)


def test_every_truncation_of_a_valid_command_is_rejected() -> None:
    encoded = encode_batch(sample_batch())
    for cut in range(len(encoded)):
        with pytest.raises(CommandDecodeError):
            decode_batch(encoded[:cut])


def test_random_garbage_never_escapes_as_another_exception() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        with contextlib.suppress(CommandDecodeError):
            decode_batch(blob)


def test_encoder_refuses_oversized_fields() -> None:
    with pytest.raises(ValueError, match="key longer"):
        encode_batch(Batch((Put("kv", b"k" * 2000, b""),)))
    with pytest.raises(ValueError, match="table name"):
        encode_batch(Batch((Delete("", b"k"),)))


def test_operations_encoded_apart_join_into_one_batch() -> None:
    ops = sample_batch().ops
    joined = join_encoded(len(ops), [encode_ops(ops[:2]), encode_ops(()), encode_ops(ops[2:])])
    assert joined == encode_batch(Batch(ops))
    assert decode_batch(joined) == Batch(ops)
