"""Pure parts of event streams: names, event records, retention policy and planner."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshorch.errors import ConfigurationError, RemoteInputError
from meshorch.streams.model import (
    HEADER_BYTES,
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
    EventTooLarge,
    InvalidStreamName,
    MalformedEvent,
    NewEvent,
    RetentionPolicy,
    StreamName,
    StreamStoreCorrupt,
    decode_event,
    encode_event,
    plan_retention,
    validate_batch,
    validate_event,
)


def test_stream_name_parses_and_prints() -> None:
    name = StreamName.parse("acme/pos/sales")
    assert (name.tenant, name.app, name.name) == ("acme", "pos", "sales")
    assert str(name) == "acme/pos/sales"


@pytest.mark.parametrize(
    "text",
    [
        "acme/pos",
        "acme/pos/sales/x",
        "Acme/pos/sales",
        "acme//sales",
        "-a/pos/s",
        "a/p/s-",
        "a/p/ü",
    ],
)
def test_bad_stream_names_are_refused_with_a_code(text: str) -> None:
    with pytest.raises(InvalidStreamName) as info:
        StreamName.parse(text)
    assert info.value.code == "invalid_stream_name"
    assert isinstance(info.value, RemoteInputError)


def test_stream_name_must_be_a_string() -> None:
    with pytest.raises(InvalidStreamName, match="must be a string"):
        StreamName.parse(42)


def test_event_roundtrip_with_and_without_key_and_level() -> None:
    for event in (
        NewEvent(b"hello", 12.5),
        NewEvent(b"", 0.0, key=b"k1", level=3),
        NewEvent(b"\x00" * 100, 1e9, level=0),
    ):
        raw = encode_event(7, validate_event(event))
        assert len(raw) == event.encoded_size()
        back = decode_event(raw)
        assert (back.seq, back.time_s, back.payload, back.key, back.level) == (
            7,
            event.time_s,
            event.payload,
            event.key,
            event.level,
        )


def test_oversized_event_is_refused_with_code() -> None:
    with pytest.raises(EventTooLarge) as info:
        validate_event(NewEvent(b"x" * (MAX_EVENT_BYTES - HEADER_BYTES + 1), 1.0))
    assert info.value.code == "event_too_large"
    assert "limit" in str(info.value)
    validate_event(NewEvent(b"x" * (MAX_EVENT_BYTES - HEADER_BYTES), 1.0))


@pytest.mark.parametrize(
    "event",
    [
        NewEvent("text", 1.0),  # type: ignore[arg-type]
        NewEvent(b"x", float("nan")),
        NewEvent(b"x", -1.0),
        NewEvent(b"x", True),
        NewEvent(b"x", 1.0, key="k"),  # type: ignore[arg-type]
        NewEvent(b"x", 1.0, key=b"k" * 2000),
        NewEvent(b"x", 1.0, level=256),
        NewEvent(b"x", 1.0, level="info"),  # type: ignore[arg-type]
        {"payload": b"x"},
    ],
)
def test_malformed_events_are_refused(event: object) -> None:
    with pytest.raises(MalformedEvent) as info:
        validate_event(event)
    assert info.value.code == "malformed_event"


def test_batch_must_be_a_bounded_list() -> None:
    with pytest.raises(MalformedEvent):
        validate_batch(b"not a list")
    with pytest.raises(MalformedEvent) as info:
        validate_batch([NewEvent(b"", 1.0)] * (MAX_BATCH_EVENTS + 1))
    assert info.value.code == "batch_too_large"


def test_decode_refuses_garbage() -> None:
    with pytest.raises(StreamStoreCorrupt):
        decode_event(b"\x01\x02")
    raw = encode_event(1, NewEvent(b"abc", 1.0))
    with pytest.raises(StreamStoreCorrupt, match="version"):
        decode_event(b"\x09" + raw[1:])
    with pytest.raises(StreamStoreCorrupt, match="lengths"):
        decode_event(raw + b"extra")


def test_policy_validate() -> None:
    RetentionPolicy().validate()
    RetentionPolicy(None, None).validate()
    for bad in (
        RetentionPolicy(max_bytes=10),
        RetentionPolicy(max_age_s=0),
        RetentionPolicy(max_age_s=float("inf")),
    ):
        with pytest.raises(ConfigurationError):
            bad.validate()
    policy = RetentionPolicy(1 << 20, 60.0)
    assert RetentionPolicy.from_json(policy.to_json()) == policy


def test_plan_drops_oldest_first_by_size() -> None:
    policy = RetentionPolicy(max_bytes=MAX_EVENT_BYTES, max_age_s=None)
    sizes = [100_000] * 5  # 500 kB, keep <= 256 KiB -> drop 3
    plan = plan_retention(policy, sum(sizes), ((1.0, s) for s in sizes), now=2.0)
    assert (plan.drop_events, plan.drop_bytes) == (3, 300_000)


def test_plan_drops_by_age_and_stops_at_first_young_event() -> None:
    policy = RetentionPolicy(max_bytes=None, max_age_s=10.0)
    events = [(0.0, 10), (5.0, 10), (95.0, 10), (1.0, 10), (99.0, 10)]
    plan = plan_retention(policy, 50, iter(events), now=100.0)
    assert (plan.drop_events, plan.drop_bytes) == (2, 20)


def test_plan_reads_lazily_and_keeps_within_bounds() -> None:
    policy = RetentionPolicy(max_bytes=MAX_EVENT_BYTES, max_age_s=10.0)

    def events() -> Iterator[tuple[float, int]]:
        yield (100.0, 10)
        raise AssertionError("read past the first event that is kept")

    plan = plan_retention(policy, 10, events(), now=100.0)
    assert plan.drop_events == 0
