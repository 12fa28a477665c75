"""Deltas relayed to the agent API (POST /v1/fleet/deltas): every attack is refused with
its reason and changes nothing; a root rotation signed by both keys is applied.

One agent runs in the test's event loop; its fleet link comes from the agent flags.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from nacl.signing import SigningKey

from meshorch.apps.settings import WorkloadSettings
from meshorch.errors import ConfigurationError
from meshorch.fleet.delta import ALL_SITES, Target, key_id, next_delta, sign
from meshorch.site.agent import Agent
from meshorch.site.config import AgentConfig
from tests.agent_token import HEADERS
from tests.agents_util import lone_agent_config
from tests.fleet.hubstub import StubHub

ROOT = SigningKey(b"r" * 32)
NEW_ROOT = SigningKey(b"n" * 32)
STRANGER = SigningKey(b"x" * 32)

SPEC = {
    "api_version": "meshorch/v1",
    "name": "relayed",
    "version": "1",
    "services": [
        {
            "name": "main",
            "replicas": 1,
            "containers": [
                {
                    "name": "main",
                    "image": "process",
                    "command": ["sleep", "1000"],
                    "resources": {"memory_limit": "32Mi", "cpu_request": 0.1},
                }
            ],
        }
    ],
}


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    # The hub URL leads nowhere: the deltas come by relay only.
    config = lone_agent_config(tmp_path, "relay-site", "acme", ROOT)
    async with Agent(config, None, WorkloadSettings(runtime="process")) as running:
        yield running


async def call(
    session: aiohttp.ClientSession, method: str, url: str, body: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    async with session.request(method, url, data=body) as response:
        return response.status, dict(await response.json())


async def fleet(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    status, body = await call(session, "GET", f"{base}/v1/fleet")
    assert status == 200, body
    return body


async def wait_fleet(session: aiohttp.ClientSession, base: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            body = await fleet(session, base)
            if body["trust"] is not None and body["site_key"] is not None:
                return body
        except (aiohttp.ClientError, AssertionError):
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("the fleet link was not configured from the flags")


async def test_relay_attacks_rotation_and_link_config(agent: Agent) -> None:
    base = f"http://{agent.config.api_address}"
    hub = StubHub("acme", ROOT)  # not served: used to sign a log
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout, headers=HEADERS) as session:
        start = await wait_fleet(session, base)
        assert start["trust"]["version"] == 0
        assert start["trust"]["trusted_keys"] == [key_id(ROOT)]
        assert start["link"]["fleet"] == "acme" and len(start["site_key"]) == 64

        async def post(raw: bytes) -> tuple[int, dict[str, Any]]:
            return await call(session, "POST", f"{base}/v1/fleet/deltas", raw)

        async def refused(raw: bytes, status: int, reason: str) -> None:
            before = await fleet(session, base)
            got, body = await post(raw)
            assert (got, body["error"]["code"]) == (status, reason), body
            assert "version" in body["error"]
            after = await fleet(session, base)
            assert after["trust"] == before["trust"]
            assert after["rejections"][-1]["reason"] == reason

        hub.publish(
            [{"op": "app.put", "spec": SPEC}], target=Target(sites=frozenset({"relay-site"}))
        )
        hub.publish([])
        status, body = await post(hub.envelopes[0])
        assert status == 200 and body["applied"] == [1], body
        status, body = await call(session, "GET", f"{base}/v1/apps/relayed")
        assert status == 200 and body["version"] == "1"
        # A list relay: the second one.
        status, body = await post(orjson.dumps([orjson.loads(hub.envelopes[1])]))
        assert status == 200 and body["applied"] == [2] and body["version"] == 2

        await refused(hub.envelopes[1], 409, "replay")
        await refused(hub.envelopes[0], 409, "rollback")
        head = hub.head_hash
        expired, _ = sign(next_delta("acme", 2, head, [], ALL_SITES, time.time() - 100, 10), [ROOT])
        await refused(expired, 409, "expired")
        stranger, _ = sign(next_delta("acme", 2, head, [], ALL_SITES, time.time(), 60), [STRANGER])
        await refused(stranger, 400, "unknown_key")
        broken, _ = sign(next_delta("acme", 2, "f" * 64, [], ALL_SITES, time.time(), 60), [ROOT])
        await refused(broken, 409, "chain_mismatch")
        good, _ = sign(next_delta("acme", 2, head, [], ALL_SITES, time.time(), 60), [ROOT])
        await refused(good[: len(good) // 2], 400, "malformed")
        await refused(good + b" " * 300_000, 400, "too_large")
        gap, _ = sign(next_delta("acme", 3, head, [], ALL_SITES, time.time(), 60), [ROOT])
        status, body = await post(gap)
        assert (status, body["error"]["code"]) == (409, "gap")
        other_fleet, _ = sign(next_delta("beta", 2, head, [], ALL_SITES, time.time(), 60), [ROOT])
        await refused(other_fleet, 400, "wrong_fleet")
        rotate = [{"op": "root.rotate", "new_key": key_id(NEW_ROOT)}]
        only_new, _ = sign(
            next_delta("acme", 2, head, rotate, ALL_SITES, time.time(), 60), [NEW_ROOT]
        )
        await refused(only_new, 400, "unknown_key")
        only_old, _ = sign(next_delta("acme", 2, head, rotate, ALL_SITES, time.time(), 60), [ROOT])
        await refused(only_old, 400, "bad_signature")
        status, body = await call(session, "GET", f"{base}/v1/apps/relayed")
        assert status == 200 and body["version"] == "1"

        # The link configuration cannot change whom the site trusts, nor its fleet.
        link = {"hub": "http://127.0.0.1:1", "fleet": "acme", "root_key": key_id(STRANGER)}
        status, body = await call(session, "PUT", f"{base}/v1/fleet/link", orjson.dumps(link))
        assert (status, body["error"]["code"]) == (409, "root_key_conflict")
        link = {"hub": "http://127.0.0.1:1", "fleet": "beta", "root_key": key_id(ROOT)}
        status, body = await call(session, "PUT", f"{base}/v1/fleet/link", orjson.dumps(link))
        assert (status, body["error"]["code"]) == (409, "fleet_conflict")
        status, body = await call(session, "PUT", f"{base}/v1/fleet/link", b'{"hub": 1}')
        assert (status, body["error"]["code"]) == (400, "bad_link")

        # Rotation signed by the old and the new key.
        hub.rotate(NEW_ROOT)
        status, body = await post(hub.envelopes[2])
        assert status == 200 and body["applied"] == [3], body
        assert (await fleet(session, base))["trust"]["trusted_keys"] == [key_id(NEW_ROOT)]
        old_signed, _ = sign(
            next_delta("acme", 3, hub.head_hash, [], ALL_SITES, time.time(), 60), [ROOT]
        )
        await refused(old_signed, 400, "unknown_key")
        hub.publish([{"op": "app.delete", "name": "relayed", "confirmed": 1}, {"op": "bogus"}])
        status, body = await post(hub.envelopes[3])
        assert status == 200 and body["applied"] == [4], body
        assert [e["reason"] for e in body["op_errors"]] == ["bad_op"]
        status, _ = await call(session, "GET", f"{base}/v1/apps/relayed")
        assert status == 404
        final = await fleet(session, base)
        assert final["trust"]["version"] == 4 and final["trust"]["head"] == hub.head_hash
        assert len(final["rejections"]) <= 20
        assert "enroll_token" not in final["link"]


def test_fleet_flags_are_all_or_none(tmp_path: Path) -> None:
    base = {
        "site": "s",
        "host_id": "h1",
        "data_dir": tmp_path,
        "api_address": "127.0.0.1:1",
        "raft_address": "127.0.0.1:2",
    }
    AgentConfig(**base).validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="all three"):
        AgentConfig(**base, hub="http://hub:1").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="root_key"):
        AgentConfig(**base, hub="http://h:1", fleet="f", fleet_key="zz").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="enroll-token"):
        AgentConfig(**base, enroll_token="t").validate()  # type: ignore[arg-type]
    config = AgentConfig(
        **base, hub="http://h:1", fleet="f", fleet_key=key_id(ROOT), enroll_token="t"
    )  # type: ignore[arg-type]
    config.validate()
    link = config.fleet_link()
    assert link is not None and link.enroll_token == "t"
