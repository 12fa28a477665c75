"""Registry pulls wait until every host speaks the protocol that brought them: a host on
an older release would take a pulled image's record for an archive."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from nacl.signing import SigningKey

from meshorch.apps.records import encode_hostinfo, hostinfo_key
from meshorch.apps.scheduler import HostInfo
from meshorch.site.agent import Agent
from meshorch.state.protocol import FEATURES
from meshorch.state.tables import APPS_TABLE
from raft import Put
from tests.agent_token import HEADERS
from tests.agents_util import lone_agent_config
from tests.waiting import until


async def test_a_pull_waits_for_every_host_and_contacts_no_registry(tmp_path: Path) -> None:
    config = lone_agent_config(tmp_path, "gate", "fleet", SigningKey.generate())
    async with Agent(config) as agent:
        await until("leader", lambda: agent.raft.status().is_leader)
        behind = FEATURES["oci_images"] - 1
        old = HostInfo("h-old", {}, 1000, 1 << 30, agent_version="0.0.9", protocol=behind)
        await agent.raft.propose([Put(APPS_TABLE, hostinfo_key("h-old"), encode_hostinfo(old))])
        url = f"http://{config.api_address}/v1/images/pull"
        # A registry nobody serves: had the pull begun, the answer would be 502.
        body = {"ref": "127.0.0.1:1/lab/app:1", "plain_http": True}
        async with (
            aiohttp.ClientSession(headers=HEADERS) as client,
            client.post(url, json=body) as response,
        ):
            answer = await response.json()
        assert response.status == 503, answer
        assert answer["error"]["code"] == "upgrade_in_progress"
        assert "h-old" in answer["error"]["message"]
        assert agent.images.manifests() == []
