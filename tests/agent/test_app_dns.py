"""Service discovery by DNS on a real three-agent site (process runtime, loopback): each
agent answers SERVICE.APP.TENANT.site.meshorch with the addresses of the ready instances,
an instance that fails readiness leaves the answer, and an unknown name is NXDOMAIN."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import pytest

from meshorch.demo.localsite import LocalSite, free_port, wait_ready
from tests.waiting import until

APP = """
api_version: meshorch/v1
name: shop
version: "1"
services:
  - name: web
    replicas: 3
    anti_affinity: true
    containers:
      - name: main
        image: process
        command: ["sh", "-c", "touch ready; exec sleep 1000"]
        ports: [{container_port: 8080}]
        resources: {memory_limit: 32Mi, cpu_request: 0.1}
        probes:
          readiness:
            exec: {command: ["sh", "-c", "test -f ready"]}
            period_s: 0.2
            timeout_s: 0.2
            failure_threshold: 1
"""
NAME = "web.shop.acme.site.meshorch."


@pytest.fixture
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalSite, dict[str, int]]]:
    local = LocalSite(hosts=3, site="dns", root=tmp_path_factory.mktemp("site"))
    ports = {host.host_id: free_port() for host in local.members}
    for host_id, port in ports.items():
        local.host_args[host_id] = ["--dns", f"127.0.0.1:{port}", "--dns-upstream", "none"]
    local.start()
    try:
        yield local, ports
    finally:
        local.stop()
        print(local.logs())


async def ask(port: int, name: str = NAME) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=2)


def addresses(answer: dns.message.Message) -> list[str]:
    return sorted(item.address for rrset in answer.answer for item in rrset)


async def test_agents_answer_service_names_with_ready_instances(
    site: tuple[LocalSite, dict[str, int]], session: aiohttp.ClientSession
) -> None:
    local, ports = site
    await wait_ready(session, local.members)
    h1 = local.members[0]
    missing = await ask(ports["h1"])
    assert missing.rcode() == dns.rcode.NXDOMAIN  # no such service yet
    async with session.post(f"{h1.url}/v1/apps?tenant=acme", data=APP.encode()) as response:
        assert response.status == 200, await response.text()

    async def all_ready() -> bool:
        async with session.get(f"{h1.url}/v1/apps/shop?consistency=local") as response:
            view = await response.json()
        instances = view.get("instances", [])
        return len(instances) == 3 and all(i["ready"] for i in instances)

    await until("three ready instances", all_ready, 30)
    answers = [await ask(port) for port in ports.values()]
    assert all(a.rcode() == dns.rcode.NOERROR and len(a.answer) == 1 for a in answers)
    answer = await ask(ports["h2"])
    assert addresses(answer) == ["127.0.0.1"]  # every host of this site is 127.0.0.1
    assert answer.answer[0].ttl <= 1
    assert (await ask(ports["h3"], "web.shop.globex.site.meshorch.")).rcode() == dns.rcode.NXDOMAIN
    assert (await ask(ports["h3"], "x.y.site.meshorch.")).rcode() == dns.rcode.NXDOMAIN
    refused = await ask(ports["h1"], "example.com.")
    assert refused.rcode() == dns.rcode.REFUSED  # --dns-upstream none

    # Readiness fails on every instance: the name stays, with no address, within a second.
    removed = [
        ready.unlink() or ready
        for host in local.members
        for ready in (host.data_dir / "instances").rglob("ready")
    ]
    assert len(removed) == 3, removed

    async def emptied() -> bool:
        answer = await ask(ports["h1"])
        return answer.rcode() == dns.rcode.NOERROR and not answer.answer

    await until("not ready instances leave the answer", emptied, 10)
