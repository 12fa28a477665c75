"""Sites' long-polls answered by the follower replica they reach
(``central_hub.replica_polls``), with three real replica processes: a site waiting at a
follower gets the delta the leader issues for it, the same bytes as the leader's answer;
a site the delta does not target is not woken; bad requests are refused before any wait;
the leader's kill -9 answers the polls waiting at a follower at once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
from nacl.signing import SigningKey
from yarl import URL

from bench.hubcluster import Cluster, Replica, cluster, until
from central_hub.relay import FIRST_ANSWER_WAIT_S
from meshorch.fleet.link_auth import sign_request, url_host
from tests.hub.helpers import spec_text
from tests.hub.replicas import route_count, send_report, site_report
from tests.hub.test_replicated_hub import _async, light_sites

POLL = "/v1/link/deltas"


async def _poll(
    running: Cluster,
    replica: Replica,
    key: SigningKey,
    site: str,
    after: int,
    wait: float,
    host: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, float, dict[str, str]]:
    """A signed long-poll of ``site`` at ``replica`` (signed for ``host``, by default its
    own): status, body bytes, seconds taken, the headers it was sent with."""
    path_qs = f"{POLL}?after={after}&wait={wait:g}"
    if headers is None:
        signed_for = host or url_host(replica.url)
        headers = sign_request(key, site, "GET", path_qs, b"", time.time(), host=signed_for)
    fingerprint = aiohttp.Fingerprint(bytes.fromhex(running.fingerprint))
    started = time.monotonic()
    async with running.session.get(
        URL(replica.url + path_qs, encoded=True), headers=headers, ssl=fingerprint
    ) as resp:
        body = await resp.read()
        return resp.status, body, time.monotonic() - started, headers


def _code(body: bytes) -> str:
    code: str = orjson.loads(body)["error"]["code"]
    return code


async def _head(running: Cluster, url: str) -> int:
    status, fleet = await running.call(url, "GET", "/v1/fleet")
    assert status == 200, fleet
    head: int = fleet["head"]
    return head


async def _two_sites(
    running: Cluster, follower: Replica, names: tuple[str, ...] = ("shop-a", "shop-b")
) -> dict[str, SigningKey]:
    """``names`` registered, each reporting to ``follower`` once (protocol 9; a name
    starting with ``old`` without a protocol, as agents before per-site views)."""
    keys = {name: SigningKey.generate() for name in names}
    leader = await running.leader()
    for name, key in keys.items():
        body = {"id": name, "labels": {}, "public_key": key.verify_key.encode().hex()}
        status, answer = await running.call(leader.url, "POST", "/v1/sites", body)
        assert status == 201, answer
    await asyncio.sleep(0.5)  # the registrations applied on every replica
    for name, key in keys.items():
        report = site_report(name)
        if name.startswith("old"):
            del report["hosts"][0]["protocol"]
        status, answer = await send_report(running, follower, key, name, orjson.dumps(report))
        assert status == 200, answer
        assert ("site_head" in answer) is not name.startswith("old"), answer  # per-site views
    return keys


async def test_a_follower_answers_a_sites_long_poll_with_the_leaders_bytes(
    tmp_path: Any, session: aiohttp.ClientSession
) -> None:
    async with cluster(tmp_path, session) as running:
        await running.ready(running.replicas[0].url)
        leader = await running.leader()
        follower, other = [r for r in running.replicas if r is not leader]
        keys = await _two_sites(running, follower)
        head = await _head(running, leader.url)
        await asyncio.sleep(0.5)  # the follower applied the log up to it
        polls_before = await route_count(running, leader.url, POLL)

        # Attacker's view: refused at the follower before any wait (wait=30 asked).
        key_a, key_b = keys["shop-a"], keys["shop-b"]
        refused = [
            await _poll(running, follower, key_a, "shop-a", head, 30, headers={}),
            await _poll(running, follower, key_b, "shop-a", head, 30),  # another site's key
            await _poll(running, follower, key_a, "shop-a", head, 30, host=url_host(other.url)),
            # A site not enrolled (or deleted: its record is gone) signing with its own key.
            await _poll(running, follower, SigningKey.generate(), "shop-z", head, 30),
        ]
        assert [(s, _code(b)) for s, b, _, _ in refused] == [
            (401, "bad_site_signature"),
            (401, "bad_site_signature"),
            (421, "misdirected_request"),
            (401, "bad_site_signature"),
        ], refused
        status, body, _, sent = await _poll(running, follower, key_a, "shop-a", head, 0)
        assert status == 200, body
        replayed = await _poll(running, follower, key_a, "shop-a", head, 0, headers=sent)
        assert (replayed[0], _code(replayed[1])) == (401, "replayed_request")
        assert all(taken < 1.0 for _, _, taken, _ in [*refused, replayed])

        # A delta for shop-a wakes shop-a's poll at the follower, not shop-b's.
        poll_a = asyncio.create_task(_poll(running, follower, key_a, "shop-a", head, 20))
        poll_b = asyncio.create_task(_poll(running, follower, key_b, "shop-b", head, 4))
        await asyncio.sleep(0.5)
        assert not poll_a.done() and not poll_b.done()
        app = {"spec": spec_text("pos", "1.0"), "placement": {"sites": ["shop-a"]}}
        status, answer = await running.call(other.url, "POST", "/v1/apps", app)
        assert status == 202, answer
        issued_at = time.monotonic()
        status_a, body_a, _, _ = await poll_a
        woken_after_s = time.monotonic() - issued_at
        assert status_a == 200, body_a
        assert woken_after_s < 5.0, woken_after_s
        answer_a = orjson.loads(body_a)
        assert answer_a["head"] > head and len(answer_a["deltas"]) >= 1, answer_a
        assert not poll_b.done()  # not woken by shop-a's delta
        status_b, body_b, taken_b, _ = await poll_b
        assert status_b == 200 and taken_b >= 3.5, (status_b, taken_b)
        answer_b = orjson.loads(body_b)
        assert answer_b["head"] == answer_a["head"], (answer_a, answer_b)
        assert body_b != body_a  # shop-b sees shop-a's delta without its operations

        # Both answered by the follower itself, the leader's bytes for the same requests.
        assert await route_count(running, leader.url, POLL) == polls_before
        for name, key, body in (("shop-a", key_a, body_a), ("shop-b", key_b, body_b)):
            status, at_leader, _, _ = await _poll(running, leader, key, name, head, 0)
            assert status == 200, at_leader
            assert at_leader == body, (name, at_leader, body)
        assert await route_count(running, leader.url, POLL) == polls_before + 2
        print(
            f"a follower's long-poll woken {woken_after_s:.2f} s after the deployment; "
            f"the other site's answered after its {taken_b:.1f} s wait"
        )


async def test_a_site_without_per_site_views_is_woken_at_a_follower_by_any_delta(
    tmp_path: Any, session: aiohttp.ClientSession
) -> None:
    async with cluster(tmp_path, session) as running:
        await running.ready(running.replicas[0].url)
        leader = await running.leader()
        follower = next(r for r in running.replicas if r is not leader)
        keys = await _two_sites(running, follower, ("shop-a", "old-b"))
        head = await _head(running, leader.url)
        await asyncio.sleep(0.5)
        polls_before = await route_count(running, leader.url, POLL)
        poll = asyncio.create_task(_poll(running, follower, keys["old-b"], "old-b", head, 20))
        await asyncio.sleep(0.5)
        assert not poll.done()
        app = {"spec": spec_text("pos", "1.0"), "placement": {"sites": ["shop-a"]}}
        status, answer = await running.call(leader.url, "POST", "/v1/apps", app)
        assert status == 202, answer
        status, body, taken, _ = await poll
        assert status == 200 and taken < 5.0, (status, taken, body)
        assert orjson.loads(body)["head"] > head
        assert await route_count(running, leader.url, POLL) == polls_before
        status, at_leader, _, _ = await _poll(running, leader, keys["old-b"], "old-b", head, 0)
        assert status == 200 and at_leader == body, (at_leader, body)

        # Holds are replicated: a held site's poll is the leader's (forwarded); a hold set
        # while a poll waits at the follower answers it held there, as at the leader.
        head = orjson.loads(body)["head"]
        status, answer = await running.call(leader.url, "POST", "/v1/sites/old-b/hold")
        assert status == 200, answer
        await asyncio.sleep(0.5)
        counted = await route_count(running, leader.url, POLL)
        status, body, _, _ = await _poll(running, follower, keys["old-b"], "old-b", head, 1)
        assert (status, orjson.loads(body)) == (200, {"head": head, "deltas": [], "held": True})
        assert await route_count(running, leader.url, POLL) == counted + 1
        poll = asyncio.create_task(_poll(running, follower, keys["shop-a"], "shop-a", head, 3))
        await asyncio.sleep(0.5)
        status, answer = await running.call(leader.url, "POST", "/v1/sites/shop-a/hold")
        assert status == 200, answer
        status, body, _, _ = await poll
        assert (status, orjson.loads(body)) == (200, {"head": head, "deltas": [], "held": True})
        assert await route_count(running, leader.url, POLL) == counted + 1


async def test_a_new_sites_first_poll_waits_at_the_follower_for_its_first_report(
    tmp_path: Any, session: aiohttp.ClientSession
) -> None:
    """A site that connects sends its first poll and its first report together: the poll
    waits at the follower for the leader's answer to the report (up to
    FIRST_ANSWER_WAIT_S) instead of holding a second connection at the leader. A site that
    reports elsewhere is still forwarded, once that wait is over."""
    async with cluster(tmp_path, session) as running:
        await running.ready(running.replicas[0].url)
        leader = await running.leader()
        follower = next(r for r in running.replicas if r is not leader)
        keys = {name: SigningKey.generate() for name in ("shop-new", "shop-elsewhere")}
        for name, key in keys.items():
            body = {"id": name, "labels": {}, "public_key": key.verify_key.encode().hex()}
            status, answer = await running.call(leader.url, "POST", "/v1/sites", body)
            assert status == 201, answer
        head = await _head(running, leader.url)
        await asyncio.sleep(0.5)  # the registrations applied on every replica
        polls_before = await route_count(running, leader.url, POLL)
        key = keys["shop-new"]
        poll = asyncio.create_task(_poll(running, follower, key, "shop-new", head, 20))
        await asyncio.sleep(0.3)  # the poll first, as a race may have it
        report = orjson.dumps(site_report("shop-new"))
        status, answer = await send_report(running, follower, key, "shop-new", report)
        assert status == 200, answer
        app = {"spec": spec_text("pos", "1.0"), "placement": {"sites": ["shop-new"]}}
        status, answer = await running.call(leader.url, "POST", "/v1/apps", app)
        assert status == 202, answer
        status, body, taken, _ = await poll
        assert status == 200 and taken < 10.0, (status, taken, body)
        assert len(orjson.loads(body)["deltas"]) >= 1
        assert await route_count(running, leader.url, POLL) == polls_before  # not forwarded

        # No report of this site here: forwarded once the wait for one is over.
        head = orjson.loads(body)["head"]
        other = keys["shop-elsewhere"]
        status, body, taken, _ = await _poll(running, follower, other, "shop-elsewhere", head, 4)
        assert status == 200, body
        assert taken >= FIRST_ANSWER_WAIT_S - 0.2, taken
        assert await route_count(running, leader.url, POLL) == polls_before + 1


async def test_the_leaders_kill_answers_the_polls_waiting_at_a_follower(
    tmp_path: Any, session: aiohttp.ClientSession
) -> None:
    async with cluster(tmp_path, session) as running:
        await running.ready(running.replicas[0].url)
        leader = await running.leader()
        follower = next(r for r in running.replicas if r is not leader)
        keys = await _two_sites(running, follower)
        head = await _head(running, leader.url)
        await asyncio.sleep(0.5)
        polls_before = await route_count(running, leader.url, POLL)
        poll = asyncio.create_task(_poll(running, follower, keys["shop-a"], "shop-a", head, 25))
        await asyncio.sleep(1.0)
        assert not poll.done()
        assert await route_count(running, leader.url, POLL) == polls_before  # not forwarded
        await leader.kill()
        killed_at = time.monotonic()
        status, body, _, _ = await poll
        answered_after_s = time.monotonic() - killed_at
        assert status == 200, body
        assert orjson.loads(body) == {"head": head, "deltas": []}
        assert answered_after_s < 15.0, answered_after_s  # the election's time, not the wait

        # Without a leader, 503 (the site fails over); with the new one, answered again.
        async def answered() -> bool:
            status, body, _, _ = await _poll(running, follower, keys["shop-b"], "shop-b", head, 0)
            assert status in (200, 503), body
            return status == 200

        await until(answered, 30, "the follower to answer polls again")
        print(f"a poll waiting at a follower answered {answered_after_s:.1f} s after the kill")


async def test_light_sites_at_the_followers_wait_there_through_a_rollout(
    tmp_path: Any, session: aiohttp.ClientSession
) -> None:
    async with cluster(tmp_path, session) as running:
        await running.ready(running.replicas[0].url)
        leader = await running.leader()
        followers = ",".join(r.url for r in running.replicas if r is not leader)
        names = [f"shop-{n:02d}" for n in range(20)]
        async with light_sites(running, names, followers) as sites:

            async def roll_out(version: str) -> None:
                app = {"spec": spec_text("pos", version), "placement": {"max_parallel": 20}}
                status, answer = await running.call(leader.url, "POST", "/v1/apps", app)
                assert status == 202, answer
                every_site = _async(lambda: set(sites.applied.values()) == {version})
                await until(every_site, 60, f"every site to apply {version}")
                assert sorted(sites.applied) == names

            await roll_out("1.0")
            # The polls opened before the sites' first reports (forwarded) are done.
            polls = await route_count(running, leader.url, POLL)
            await roll_out("2.0")
            assert sites.rejected == [], sites.rejected
            # The second rollout reached every site through the followers' own polls.
            assert await route_count(running, leader.url, POLL) == polls
