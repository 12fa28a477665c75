"""Site reports stay on the hub replica they reach (``central_hub.relay``), with three real
replica processes: a follower answers them itself, the leader sees them within a push,
bad ones are refused at the follower, a rollout to sites reporting to followers
completes, and the leader's kill -9 loses nothing that must survive."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
from nacl.signing import SigningKey

from bench.hubcluster import Cluster, cluster, until
from central_hub.relay import RELAY_HEADER, RELAY_PATH
from meshorch.fleet.link_auth import sign_request, url_host
from tests.hub.helpers import spec_text
from tests.hub.replicas import REPORT, route_count, send_report, site_report
from tests.hub.test_replicated_hub import _async, light_sites


async def _last_seen(running: Cluster, url: str, site: str) -> float | None:
    status, answer = await running.call(url, "GET", f"/v1/sites/{site}")
    assert status == 200, answer
    seen: float | None = answer["last_seen"]
    return seen


async def test_a_follower_answers_reports_and_refuses_bad_ones_before_any_work(
    tmp_path: Any, session: aiohttp.ClientSession
) -> None:
    async with cluster(tmp_path, session) as running:
        await running.ready(running.replicas[0].url)
        leader = await running.leader()
        follower, other = [r for r in running.replicas if r is not leader]
        key = SigningKey.generate()
        body = {"id": "shop-x", "labels": {}, "public_key": key.verify_key.encode().hex()}
        status, answer = await running.call(leader.url, "POST", "/v1/sites", body)
        assert status == 201, answer
        await asyncio.sleep(0.5)  # the registration applied on every replica
        handled_before = await route_count(running, leader.url, REPORT)
        good = orjson.dumps(site_report("shop-x"))

        # Refused at the follower, and nothing recorded: unsigned, signed by another key,
        # for another site's name, malformed, and a request signed for another replica.
        status, answer = await send_report(running, follower, key, "shop-x", good, headers={})
        assert (status, answer["error"]["code"]) == (401, "bad_site_signature")
        status, answer = await send_report(running, follower, SigningKey.generate(), "shop-x", good)
        assert (status, answer["error"]["code"]) == (401, "bad_site_signature")
        status, answer = await send_report(running, follower, key, "shop-y", good)
        assert (status, answer["error"]["code"]) == (401, "bad_site_signature")
        status, answer = await send_report(running, follower, key, "shop-x", b"{not json")
        assert (status, answer["error"]["code"]) == (400, "bad_json")
        wrong = orjson.dumps({**site_report("shop-x"), "applied_version": "seven"})
        status, answer = await send_report(running, follower, key, "shop-x", wrong)
        assert status == 400, answer
        await asyncio.sleep(1.5)  # a push would have gone by now
        assert await _last_seen(running, leader.url, "shop-x") is None

        # A good one is answered by the follower (its first waits for the push), with
        # what the leader's answer carries; the leader has it at once.
        headers = sign_request(
            key, "shop-x", "POST", REPORT, good, time.time(), host=url_host(follower.url)
        )
        status, answer = await send_report(running, follower, key, "shop-x", good, headers=headers)
        assert status == 200, answer
        assert type(answer["head"]) is int and "site_head" in answer, answer
        assert await _last_seen(running, leader.url, "shop-x") is not None

        # The same request again: a replay, at the follower it reached and at the others
        # (it names the follower's address, which it is signed for).
        for replica in (follower, other, leader):
            status, answer = await send_report(
                running, replica, key, "shop-x", good, headers=headers
            )
            expected = "replayed_request" if replica is follower else "misdirected_request"
            assert answer["error"]["code"] == expected, (replica.url, status, answer)

        # A later report with nothing new is answered from what the follower knows, and
        # the leader sees it within about a push.
        seen_before = await _last_seen(running, leader.url, "shop-x")
        sent_at = time.monotonic()
        later = orjson.dumps(site_report("shop-x"))
        status, answer = await send_report(running, follower, key, "shop-x", later)
        assert status == 200, answer

        async def moved() -> bool:
            return await _last_seen(running, leader.url, "shop-x") != seen_before

        await until(moved, 5, "the leader to see the follower's report")
        seen_after_s = time.monotonic() - sent_at
        assert seen_after_s < 2.0, seen_after_s
        # A push that is not a replica's is refused by the leader, and records nothing.
        fingerprint = aiohttp.Fingerprint(bytes.fromhex(running.fingerprint))
        push = orjson.dumps(
            {"v": 1, "reports": [{"site": "shop-x", "report": site_report("shop-x", applied=99),
                                  "nonce": "ab" * 16, "signed_at": time.time()}]}
        )  # fmt: skip
        forged = f"{time.time():.3f} {'0' * 64}"
        for headers in ({}, {RELAY_HEADER: forged}, {RELAY_HEADER: "junk"}):
            async with session.post(
                leader.url + RELAY_PATH, data=push, headers=headers, ssl=fingerprint
            ) as resp:
                assert resp.status == 401, await resp.text()
        status, site = await running.call(leader.url, "GET", "/v1/sites/shop-x")
        assert site["applied_version"] == 0, site
        # None of this reached the leader's hub as a report request; one sent to the
        # leader itself does (the count counts).
        assert await route_count(running, leader.url, REPORT) == handled_before
        status, answer = await send_report(
            running, leader, key, "shop-x", orjson.dumps(site_report("shop-x")), local=False
        )
        assert status == 200, answer
        assert await route_count(running, leader.url, REPORT) == handled_before + 1
        print(f"a follower's report seen by the leader after {seen_after_s:.2f} s")


async def test_a_rollout_to_sites_reporting_to_followers_survives_the_leaders_kill_9(
    tmp_path: Any, session: aiohttp.ClientSession
) -> None:
    async with cluster(tmp_path, session) as running:
        await running.ready(running.replicas[0].url)
        leader = await running.leader()
        followers = [r for r in running.replicas if r is not leader]
        names = [f"shop-{n:02d}" for n in range(20)]
        # Every site knows the followers only, so none of its reports reaches the leader.
        async with light_sites(running, names, ",".join(r.url for r in followers)) as sites:
            handled = await route_count(running, leader.url, REPORT)
            await asyncio.sleep(4)  # every site reports again
            assert await route_count(running, leader.url, REPORT) == handled  # none forwarded
            body = {"spec": spec_text("pos", "2.0"), "placement": {"max_parallel": 5}}
            status, answer = await running.call(followers[0].url, "POST", "/v1/apps", body)
            assert status == 202, answer
            deployment = answer["id"]
            await until(_async(lambda: len(sites.applied) >= 5), 60, "the first wave")
            status, answer = await running.call(
                followers[0].url, "POST", "/v1/tenants", {"id": "kept"}
            )
            assert status == 201, answer
            await leader.kill()

            async def succeeded() -> bool:
                status, state = await running.call(
                    followers[1].url, "GET", f"/v1/deployments/{deployment}"
                )
                return status == 200 and state["state"] == "succeeded"

            await until(succeeded, 120, f"deployment {deployment} to succeed after the kill")
            # Each site says it applied once its report of it is answered (after the
            # leader took it).
            await until(_async(lambda: sorted(sites.applied) == names), 30, "every site")
            assert sites.rejected == [], sites.rejected
            assert set(sites.applied.values()) == {"2.0"}
            status, answer = await running.call(followers[1].url, "GET", "/v1/tenants/kept")
            assert status == 200, answer
            # The new leader's view of every site comes from the pushes (soft state: the
            # sites that finished before the kill within their next report).
            new_leader = await running.leader()

            async def every_site_seen() -> bool:
                for name in names:
                    status, site = await running.call(new_leader.url, "GET", f"/v1/sites/{name}")
                    assert status in (200, 503), site
                    if status != 200 or site["applied_version"] is None:
                        return False
                return True

            await until(every_site_seen, 15, "the new leader to see every site's report")
