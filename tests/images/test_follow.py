"""A blob read as it is written (``meshorch.images.follow``), with real files: a writer
task appends while the follow reads; the partial becomes the blob by a rename, as
``BlobStore.fetch`` does; a follow stops at its size, when nothing arrives for its idle
time, or when the partial is removed. The route around it is tested with real agents in
tests/agent/test_pull_chain.py."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from meshorch.errors import RemoteInputError
from meshorch.images.follow import Follow, FollowSlots, parse_follow, parse_start
from meshorch.images.store import signed_target

DATA = os.urandom(3 * (1 << 20) + 4321)


async def collect(follow: Follow) -> bytes:
    return b"".join([chunk async for chunk in follow.chunks()])


async def write_slowly(path: Path, data: bytes, then: Path | None = None) -> None:
    with open(path, "wb") as handle:
        for start in range(0, len(data), 300_000):
            handle.write(data[start : start + 300_000])
            handle.flush()
            await asyncio.sleep(0.01)
    if then is not None:
        os.replace(path, then)


async def test_a_follow_reads_a_partial_as_it_grows_and_through_its_rename(
    tmp_path: Path,
) -> None:
    blob, partial = tmp_path / "blob", tmp_path / "partial"
    with Follow(blob, partial, 1000, len(DATA), idle_s=2.0, poll_s=0.01) as follow:
        writer = asyncio.create_task(write_slowly(partial, DATA, then=blob))
        assert await follow.wait_for_file(1.0)
        got = await collect(follow)
        await writer
    assert got == DATA[1000:]


async def test_a_follow_ends_short_when_nothing_arrives_for_its_idle_time(
    tmp_path: Path,
) -> None:
    partial = tmp_path / "partial"
    partial.write_bytes(DATA[:5000])
    with Follow(tmp_path / "blob", partial, 0, len(DATA), idle_s=0.3, poll_s=0.01) as follow:
        assert await follow.wait_for_file(1.0)
        started = time.monotonic()
        got = await collect(follow)
    assert got == DATA[:5000]
    assert 0.3 <= time.monotonic() - started < 2.0


async def test_a_follow_ends_when_the_partial_is_removed_and_waits_only_so_long_for_one(
    tmp_path: Path,
) -> None:
    partial = tmp_path / "partial"
    partial.write_bytes(DATA[:5000])
    with Follow(tmp_path / "blob", partial, 0, len(DATA), idle_s=30.0, poll_s=0.01) as follow:
        assert await follow.wait_for_file(1.0)
        partial.unlink()  # a transfer that failed its digest
        started = time.monotonic()
        assert await collect(follow) == DATA[:5000]
        assert time.monotonic() - started < 1.0
    with Follow(tmp_path / "b", tmp_path / "p", 0, 10, idle_s=0.2, poll_s=0.01) as nothing:
        assert not await nothing.wait_for_file(0.2)


async def test_a_follow_never_sends_past_its_size(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(DATA + b"more than the blob")
    with Follow(blob, tmp_path / "partial", 0, len(DATA), idle_s=0.2) as follow:
        assert await follow.wait_for_file(1.0)
        assert await collect(follow) == DATA


@pytest.mark.parametrize("raw", ["", "abc", "-1", "0", "1e3", " 5", "11", "9" * 21])
def test_a_bad_follow_size_is_refused(raw: str) -> None:
    with pytest.raises(RemoteInputError) as refused:
        parse_follow(raw, 10)
    assert refused.value.code == "bad_follow"


def test_follow_sizes_and_ranges() -> None:
    assert parse_follow("10", 10) == 10
    assert parse_start(None, 10) == 0
    assert parse_start("bytes=9-", 10) == 9
    for header in ("bytes=10-", "bytes=1-5", "bytes=-5", "items=1-", "bytes=a-"):
        with pytest.raises(RemoteInputError):
            parse_start(header, 10)


def test_a_peer_holds_a_few_follows_at_once() -> None:
    slots = FollowSlots(per_peer=2)
    assert slots.take("h2") and slots.take("h2") and not slots.take("h2")
    assert slots.take("h3")
    slots.give("h2")
    assert slots.take("h2")


def test_a_peer_signature_covers_the_query() -> None:
    url = "http://10.99.0.2:7700/v1/images/partials/sha256:ab?follow=42"
    assert signed_target(url) == "/v1/images/partials/sha256:ab?follow=42"
    assert signed_target("http://10.99.0.2:7700/v1/images/blobs/x") == "/v1/images/blobs/x"
