"""A long-poll whose answer was lost (a connection that died with a cut uplink) is
abandoned as soon as a report shows the hub past the site's version, not at its timeout."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from meshorch.fleet.client import LinkClient
from meshorch.fleet.delta import TrustState
from meshorch.fleet.site_link import SiteLink


class HangingClient:
    """``fetch`` never answers, like a poll whose answer the network dropped."""

    def __init__(self) -> None:
        self.polls = 0

    async def fetch(self, after: int, wait_s: float) -> tuple[int, list[bytes]]:
        self.polls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def link_at(version: int) -> SiteLink:
    nothing = cast(Any, None)  # the poll reads no state
    link = SiteLink(
        nothing,
        nothing,
        site_id="s1",
        flag_config=None,
        secrets=nothing,
        streams=nothing,
        gossip_address=("127.0.0.1", 0),
    )
    state = TrustState("lab", frozenset(), version=version)
    link.trust_state = lambda: state  # type: ignore[method-assign]
    return link


async def test_a_poll_open_while_the_hub_is_ahead_is_abandoned(monkeypatch: Any) -> None:
    monkeypatch.setattr("meshorch.fleet.site_link.STALE_POLL_S", 0.0)
    link, client = link_at(3), HangingClient()
    poll = asyncio.create_task(link._poll(cast(LinkClient, client), 3))
    await asyncio.sleep(0.01)
    link._check_poll(3)  # the hub has nothing new: the poll may stay open
    await asyncio.sleep(0.01)
    assert not poll.done()
    link._check_poll(4)
    assert await asyncio.wait_for(poll, 1.0) is None
    assert client.polls == 1


async def test_a_fresh_poll_is_left_alone() -> None:
    link, client = link_at(3), HangingClient()
    poll = asyncio.create_task(link._poll(cast(LinkClient, client), 3))
    await asyncio.sleep(0.01)
    link._check_poll(4)  # the hub answers it at once; no need to send another
    await asyncio.sleep(0.01)
    assert not poll.done()
    poll.cancel()
    await asyncio.gather(poll, return_exceptions=True)
    link._check_poll(4)  # no poll open: nothing to do
