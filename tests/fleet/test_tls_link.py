"""A real site of agent processes enrolled with a real hub process over TLS, the hub's
self-signed certificate pinned by ``--hub-fingerprint``: a deployment reaches the site;
the same site pinned to another certificate never talks to the hub."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson

from meshorch.demo.localsite import LocalHub, LocalSite, wait_ready
from meshorch.demo.loopback import DEMO_APP
from tests.waiting import until


async def test_a_site_enrolled_over_tls_with_a_pinned_fingerprint_gets_a_deployment(
    tmp_path: Path,
) -> None:
    hub = LocalHub(tmp_path / "hub", fleet="acme", tls=True)
    hub.start()
    good = LocalSite(hosts=1, site="shop-tls", root=tmp_path / "good")
    wrong = LocalSite(hosts=1, site="shop-wrong", root=tmp_path / "wrong")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            root_key = await hub.wait_ready(session)
            assert hub.url.startswith("https://") and hub.fingerprint is not None
            headers = {"Authorization": f"Bearer {hub.admin_token}"}

            async def call(method: str, path: str, body: object = None) -> dict[str, object]:
                async with session.request(
                    method, hub.url + path, json=body, headers=headers, ssl=hub.ssl
                ) as response:
                    answer = await response.json()
                    assert response.status < 300, answer
                    return dict(answer)

            tokens = {}
            for site in (good, wrong):
                created = await call("POST", "/v1/sites", {"id": site.site, "labels": {"t": "x"}})
                tokens[site.site] = str(created["enroll_token"])
            for site, fingerprint in ((good, hub.fingerprint), (wrong, "ab" * 32)):
                site.extra_args = [
                    "--hub", hub.url, "--fleet", "acme", "--fleet-key", root_key,
                    "--hub-fingerprint", fingerprint, "--enroll-token", tokens[site.site],
                ]  # fmt: skip
                site.start()
            for site in (good, wrong):
                async with site.session() as agents:
                    await wait_ready(agents, site.members, timeout_s=60)

            async def enrolled() -> bool:
                return (await call("GET", "/v1/sites/shop-tls"))["public_key"] is not None

            await until("the pinned site enrolled over TLS", enrolled, 30)
            await call("POST", "/v1/apps", {"spec": DEMO_APP, "placement": {"sites": ["shop-tls"]}})
            agent = good.members[0]
            async with good.session() as agents:

                async def deployed() -> bool:
                    async with agents.get(f"{agent.url}/v1/apps/hello") as response:
                        return response.status == 200

                await until("the app reached the site over the TLS link", deployed, 60)
                async with agents.get(f"{agent.url}/v1/fleet") as response:
                    link = (await response.json())["link"]
                assert link["hub_fingerprint"] == hub.fingerprint and link["enrolled"]
            # The site pinned to another certificate never enrolled (its token unused) and
            # says why in its log.
            wrong_site = await call("GET", "/v1/sites/shop-wrong")
            assert wrong_site["public_key"] is None, orjson.dumps(wrong_site)

            def refused_in_log() -> bool:
                log = wrong.members[0].log_path
                return log is not None and "not the pinned" in log.read_text(errors="replace")

            await until("the wrong pin's refusal logged", refused_in_log, 30)
    finally:
        good.stop()
        wrong.stop()
        hub.stop()
