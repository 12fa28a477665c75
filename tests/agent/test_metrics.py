"""An agent's Prometheus /metrics, read from a real agent and parsed by prometheus-client."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from nacl.signing import SigningKey
from prometheus_client.parser import text_string_to_metric_families

from meshorch.site.agent import Agent
from tests.agent_token import HEADERS
from tests.agents_util import lone_agent_config
from tests.waiting import until


async def scrape(
    session: aiohttp.ClientSession, api: str
) -> dict[str, list[tuple[dict[str, str], float]]]:
    async with session.get(f"http://{api}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return found


async def test_agent_metrics_show_raft_streams_instances_and_api_latency(tmp_path: Path) -> None:
    config = lone_agent_config(tmp_path, "metrics", "fleet", SigningKey.generate())
    async with Agent(config) as agent, aiohttp.ClientSession(headers=HEADERS) as session:
        await until("leader", lambda: agent.raft.status().is_leader)
        await until("registered", lambda: agent.streams.host_protocols())
        url = f"http://{config.api_address}/v1/streams/acme/pos/events/events"
        async with session.post(url, json={"events": [{"payload": str(i)} for i in range(3)]}) as r:
            assert r.status == 200, await r.text()
        metrics = await scrape(session, config.api_address)
        assert metrics["meshorch_raft_is_leader"] == [({}, 1.0)]
        assert metrics["meshorch_site_hosts"] == [({}, 1.0)]
        assert metrics["meshorch_raft_term"][0][1] >= 1
        assert metrics["meshorch_raft_apply_lag"][0][1] >= 0
        assert metrics["meshorch_stream_backlog_events"] == [({"stream": "acme/pos/events"}, 3.0)]
        assert metrics["meshorch_stream_dropped_events"] == [({"stream": "acme/pos/events"}, 0.0)]
        assert 0 < metrics["meshorch_host_disk_used_ratio"][0][1] < 1
        assert metrics["meshorch_host_network_receive_bytes_total"][0][1] >= 0
        produced = [
            value
            for labels, value in metrics["meshorch_agent_api_request_seconds_count"]
            if labels == {"route": "/v1/streams/{tenant}/{app}/{name}/events", "status": "2xx"}
        ]
        assert produced == [1.0]
