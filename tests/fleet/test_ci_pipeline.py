"""The CI example (``examples/ci/``) run for real: its GitHub Actions workflow calls
``examples/ci/deploy.sh``, and this test runs that script, as the workflow's step does
(the same environment variables), against a real hub process over TLS and two sites of
real agent processes linked to it. Exit codes: 0 a healthy rollout, 1 a failed wave (the
app's container exits), 4 a timeout (the app never gets ready), 2 a bad setting."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from meshorch.apps.spec import parse_app_spec
from meshorch.cli.fleet import read_deploy_file
from meshorch.demo.localsite import LocalHub, LocalSite, wait_ready
from tests.waiting import until

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ci"
SITES = ("store-1", "store-2")

APP = """\
api_version: meshorch/v1
name: {name}
version: "1"
services:
  - name: web
{restart}    containers:
      - name: main
        image: process
        command: ["sh", "-c", "{command}"]
        resources: {{memory_limit: 16Mi, cpu_request: 0.05}}
{probes}placement:
  match: {{region: eu}}
  max_parallel: 1
"""


def app(name: str, command: str, *, restart: str = "", probes: str = "") -> str:
    return APP.format(name=name, command=command, restart=restart, probes=probes)


@dataclass
class Pipeline:
    hub: LocalHub
    token: str  # an operator token, as the workflow's secret
    tmp: Path

    async def run(self, spec: str | None, **env: str) -> tuple[int, str, str]:
        """``examples/ci/deploy.sh`` with the workflow step's environment."""
        path = self.tmp / "app.yaml"
        if spec is not None:
            path.write_text(spec)
        bin_dir = str(Path(sys.executable).parent)  # this venv's `meshorch`
        step_env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            "HOME": str(self.tmp),  # no known_hubs of the machine: a fresh runner
            "MESHORCH_HUB": self.hub.url,
            "MESHORCH_HUB_FINGERPRINT": str(self.hub.fingerprint),
            "MESHORCH_TOKEN": self.token,
            **env,
        }
        process = await asyncio.create_subprocess_exec(
            "bash", str(EXAMPLE / "deploy.sh"), str(path), env=step_env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def pipeline(tmp_path: Path) -> AsyncIterator[Pipeline]:
    hub = LocalHub(tmp_path / "hub", fleet="ci", tls=True, extra_args=["--wave-timeout", "90"])
    sites = [LocalSite(hosts=1, site=s, root=tmp_path / s) for s in SITES]
    hub.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            root_key = await hub.wait_ready(session)
            admin = {"Authorization": f"Bearer {hub.admin_token}"}

            async def call(method: str, path: str, body: object = None) -> dict[str, object]:
                async with session.request(
                    method, hub.url + path, json=body, headers=admin, ssl=hub.ssl
                ) as response:
                    answer = await response.json()
                    assert response.status < 300, answer
                    return dict(answer)

            for site in sites:
                created = await call(
                    "POST", "/v1/sites", {"id": site.site, "labels": {"region": "eu"}}
                )
                site.extra_args = [
                    "--hub", hub.url, "--fleet", "ci", "--fleet-key", root_key,
                    "--hub-fingerprint", str(hub.fingerprint),
                    "--enroll-token", str(created["enroll_token"]),
                ]  # fmt: skip
                site.start()
            for site in sites:
                async with site.session() as agents:
                    await wait_ready(agents, site.members, timeout_s=60)

            async def reporting() -> bool:
                listed = await call("GET", "/v1/sites")
                return all(s["last_seen"] is not None for s in listed["sites"])  # type: ignore[attr-defined]

            await until("both sites reporting to the hub", reporting, 60)
            operator = await call("POST", "/v1/tokens", {"role": "operator"})
        yield Pipeline(hub, str(operator["token"]), tmp_path)
    finally:
        for site in sites:
            site.stop()
        hub.stop()


def test_the_workflow_runs_the_script_with_the_hubs_settings() -> None:
    workflow = yaml.safe_load((EXAMPLE / "deploy.yml").read_text())
    [job] = workflow["jobs"].values()
    runs = [step for step in job["steps"] if "examples/ci/deploy.sh" in step.get("run", "")]
    assert len(runs) == 1, job["steps"]
    env = runs[0]["env"]
    assert {"MESHORCH_HUB", "MESHORCH_HUB_FINGERPRINT", "MESHORCH_TOKEN"} <= set(env)
    assert "secrets." in env["MESHORCH_TOKEN"]  # the token is a secret, never a variable
    script = (EXAMPLE / "deploy.sh").read_text()
    assert all(name in script for name in env)  # the script reads what the step sets
    assert os.access(EXAMPLE / "deploy.sh", os.X_OK)
    # The spec the workflow deploys is a valid one.
    deploy = read_deploy_file(EXAMPLE / runs[0]["run"].split()[-1].replace("deploy/", ""))
    assert parse_app_spec(orjson.dumps(deploy["spec"])).name == "shop"
    assert deploy["placement"]["max_parallel"] == 1


async def test_deploy_script_exit_codes_against_a_real_hub_and_sites(pipeline: Pipeline) -> None:
    # A healthy rollout: two waves, one site each; 0.
    status, out, err = await pipeline.run(app("ci-ok", "sleep 1000"))
    assert status == 0, out + err
    assert "to 2 site(s) in 2 wave(s)" in out and "succeeded" in out
    assert "every wave is healthy" in out
    for site in SITES:
        assert re.search(rf"^  {site} +healthy$", out, re.MULTILINE), out

    # A container that exits, never restarted: the first wave fails; 1, naming the site.
    status, out, err = await pipeline.run(
        app("ci-crash", "exit 3", restart="    restart: {policy: never}\n")
    )
    assert status == 1, out + err
    assert "site store-1 failed: failed: ci-crash.web.0" in err, err
    assert not re.search(r"^  store-2 +(updating|healthy)", out, re.MULTILINE)  # stopped at wave 1
    assert "the rollout FAILED" in err

    # Never ready (its readiness probe never passes): still rolling out after the pipeline's
    # timeout; 4. The hub's own wave timeout (90 s) is longer.
    probe = '        probes:\n          readiness: {exec: {command: ["false"]}, period_s: 2}\n'
    status, out, err = await pipeline.run(
        app("ci-stuck", "sleep 1000", probes=probe), MESHORCH_DEPLOY_TIMEOUT="4"
    )
    assert status == 4, out + err
    assert "still running after 4 s" in err and "still going after 4s" in err

    # Bad settings fail before anything is deployed; 2.
    status, _, err = await pipeline.run(None, MESHORCH_HUB_FINGERPRINT="")
    assert status == 2 and "MESHORCH_HUB_FINGERPRINT" in err
    status, _, err = await pipeline.run(None, MESHORCH_HUB_FINGERPRINT="ab" * 32)
    assert status == 2 and "nothing was sent" in err
    status, _, err = await pipeline.run(None, MESHORCH_TOKEN="mht_nope_nope")
    assert status == 2 and "unknown or revoked token" in err
