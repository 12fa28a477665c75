"""Applications on a site of real agents (process runtime, loopback): placement,
restarts with backoff, failover, rolling upgrade and automatic rollback."""

import asyncio
import time
from typing import Any

import aiohttp

from meshorch.demo.localsite import LocalSite, wait_ready

APP = """
api_version: meshorch/v1
name: shop
version: "{version}"
services:
  - name: web
    replicas: 2
    anti_affinity: true
    containers:
      - name: main
        image: process
        command: ["sh", "-c", "{web_command}"]
        resources: {{memory_limit: 64Mi, cpu_request: 0.1}}
        probes:
          readiness:
            exec: {{command: ["sh", "-c", "{ready_check}"]}}
            period_s: 0.2
            timeout_s: 0.2
            failure_threshold: 1
  - name: worker
    replicas: 1
    containers:
      - name: main
        image: process
        command: ["sleep", "1000"]
        resources: {{memory_limit: 32Mi, cpu_request: 0.1}}
"""

HEALTHY = "echo {version} > served; exec sleep 1000"


def spec(version: str, *, web_command: str = HEALTHY, ready_check: str = "test -f served") -> str:
    return APP.format(
        version=version, web_command=web_command.format(version=version), ready_check=ready_check
    )


async def apply(session: aiohttp.ClientSession, url: str, text: str) -> dict[str, Any]:
    async with session.post(f"{url}/v1/apps", data=text.encode()) as response:
        body = dict(await response.json())
        assert response.status == 200, body
        return body


async def app_view(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/v1/apps/shop?consistency=local") as response:
        assert response.status == 200
        return dict(await response.json())


async def wait_app(
    session: aiohttp.ClientSession, url: str, predicate: Any, timeout_s: float, what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            view = await app_view(session, url)
        except (aiohttp.ClientError, AssertionError):
            await asyncio.sleep(0.2)
            continue
        if predicate(view):
            return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout_s}s: {what}; last view: {view}")


def all_ready(version: str, count: int = 3) -> Any:
    def check(view: dict[str, Any]) -> bool:
        instances = view["instances"]
        return len(instances) == count and all(
            i["ready"] and i["version"] == version for i in instances
        )

    return check


async def test_an_app_runs_where_its_spec_says(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    url = ready_site.members[0].url
    await apply(session, url, spec("1"))
    view = await wait_app(session, url, all_ready("1"), 30, "three instances ready")
    web_hosts = [i["host"] for i in view["instances"] if i["service"] == "web"]
    assert len(set(web_hosts)) == 2  # anti-affinity
    async with session.get(f"{url}/v1/apps") as response:
        listing = (await response.json())["apps"]
    assert [(a["name"], a["ready"]) for a in listing] == [("shop", 3)]


async def test_a_crashing_container_is_restarted_with_backoff(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    url = ready_site.members[1].url
    await apply(session, url, spec("1", web_command="sleep 0.3; exit 3"))

    def restarted(view: dict[str, Any]) -> bool:
        web = [i for i in view["instances"] if i["service"] == "web"]
        return len(web) == 2 and all(i["restarts"] >= 2 for i in web)

    await wait_app(session, url, restarted, 30, "web restarted twice")
    await asyncio.sleep(4)
    view = await app_view(session, url)
    web = [i for i in view["instances"] if i["service"] == "web"]
    assert all(not i["ready"] for i in web)
    # Without backoff a 0.3 s crash loop restarts ~13 times in 4 s; with 1 s, 2 s, 4 s...
    assert all(2 <= i["restarts"] <= 6 for i in web), web


async def test_a_container_failing_liveness_is_restarted(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    url = ready_site.members[0].url
    live = APP.replace(
        "probes:\n          readiness:",
        'probes:\n          liveness:\n            exec: {{command: ["test", "-f", "alive"]}}'
        "\n            period_s: 0.2\n            timeout_s: 0.2\n            failure_threshold: 2"
        "\n          readiness:",
    )
    # Alive for a second, then the process hangs without its marker file.
    hang = "touch alive; echo 1 > served; sleep 1; rm alive; exec sleep 1000"
    await apply(session, url, live.format(version="1", web_command=hang, ready_check="true"))

    def restarted(view: dict[str, Any]) -> bool:
        web = [i for i in view["instances"] if i["service"] == "web"]
        return len(web) == 2 and all(i["restarts"] >= 1 for i in web)

    await wait_app(session, url, restarted, 40, "web restarted by its liveness probe")


async def test_instances_of_a_killed_host_move_to_the_others(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    site = ready_site
    url = site.members[0].url
    await apply(session, url, spec("1"))
    view = await wait_app(session, url, all_ready("1"), 30, "ready")
    statuses = await wait_ready(session, site.members)
    leader = next(iter(statuses.values()))["leader"]
    victim = next(i["host"] for i in view["instances"] if i["host"] != leader)
    host = site.host(victim)
    site.kill(host)
    survivors = [h for h in site.members if h is not host]
    started = time.monotonic()

    def moved(view: dict[str, Any]) -> bool:
        return all_ready("1")(view) and all(i["host"] != victim for i in view["instances"])

    await wait_app(session, survivors[0].url, moved, 30, "instances moved off the dead host")
    print(f"failover took {time.monotonic() - started:.1f}s")
    site.start_host(host)  # it comes back; nothing healthy moves back
    await wait_ready(session, site.members)
    after = await app_view(session, survivors[0].url)
    assert all(i["host"] != victim for i in after["instances"] if i["service"] == "worker")


async def test_upgrade_rolls_and_a_failing_version_rolls_back(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    url = ready_site.members[2].url
    await apply(session, url, spec("1"))
    await wait_app(session, url, all_ready("1"), 30, "v1 ready")
    serving: list[int] = []

    def watching(predicate: Any) -> Any:
        def check(view: dict[str, Any]) -> bool:
            web = [i for i in view["instances"] if i["service"] == "web"]
            serving.append(sum(1 for i in web if i["ready"]))
            return bool(predicate(view))

        return check

    await apply(session, url, spec("2"))
    await wait_app(session, url, watching(all_ready("2")), 60, "v2 everywhere")
    await apply(session, url, spec("3", ready_check="false"))

    def rolled_back(view: dict[str, Any]) -> bool:
        rollout = view["rollout"]
        return bool(rollout and rollout["phase"] == "rolled_back") and all_ready("2")(view)

    view = await wait_app(session, url, watching(rolled_back), 90, "v3 rolled back to v2")
    assert len(serving) > 20 and min(serving) >= 1  # some web instance served all along
    kinds = [e["kind"] for e in view["events"]]
    assert "rollback_started" in kinds and "rollback_done" in kinds
    assert view["rollout"]["to"] == "3" and "3" in view["rollout"]["reason"]


async def test_a_bad_spec_lists_every_problem(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    url = ready_site.members[0].url
    bad = "api_version: meshorch/v1\nname: Bad_Name\nservices:\n  - name: web\n    replicas: -1\n"
    async with session.post(f"{url}/v1/apps", data=bad.encode()) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["code"] == "bad_spec"
    joined = "\n".join(error["problems"])
    for path in ("name", "version", "services[0].replicas", "services[0].containers"):
        assert path in joined
    async with session.get(f"{url}/v1/apps") as response:
        assert (await response.json())["apps"] == []
