"""An agent imports only what its configuration uses, and stays small.

A real agent process (static mode, process runtime, like ``LocalSite``) runs an application
given as JSON, then writes the modules it has imported (``MESHORCH_DEBUG_MODULES``, on
SIGUSR1): the hub, the lab, the chaos suite, the demos, the CLI's client code, and what only
mesh mode, the site DNS or a YAML spec use are not among them.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import aiohttp
import orjson
import pytest

from meshorch.cli.main import DEBUG_MODULES_ENV
from meshorch.demo.localsite import LocalSite, wait_ready
from tests.waiting import until

# Never in an agent process: (prefix, why). A prefix matches the module and its submodules.
NEVER_IMPORTED = (
    ("central_hub", "the hub"),
    ("meshorch.lab", "the lab"),
    ("meshorch.chaos", "the chaos suite"),
    ("meshorch.demo", "the demos"),
    ("meshorch.cli.agent_client", "the CLI's client code"),
    ("meshorch.cli.agent_ops", "the CLI's client code"),
    ("meshorch.cli.fleet", "the CLI's client code"),
    ("meshorch.cli.secrets", "the CLI's client code"),
    ("yaml", "a YAML spec only (this one is JSON)"),
    ("zeroconf", "mesh mode only (mDNS)"),
    ("netmesh.discovery", "mesh mode only (mDNS)"),
    ("dns", "the site DNS only (off in static mode)"),
    ("meshorch.net.dns", "the site DNS only (off in static mode)"),
    ("gossip", "a leader linked to a hub only"),
    ("meshorch.releases.wheels", "installing a release only"),
    ("cryptography", "Raft's Fernet takes AES from hashlib's libcrypto (raft.fernet)"),
    ("meshorch.runtime.podman", "the podman runtime only (this is the process runtime)"),
    ("meshorch.runtime.images", "the podman runtime only (the busybox image)"),
    ("tarfile", "the podman runtime only"),
    ("netmesh.wireguard", "mesh mode only (the WireGuard interface)"),
    ("difflib", "a misspelt spec key only (did you mean)"),
    ("meshorch.releases.launcher", "an agent upgrade only"),
)

# Never mapped into an agent process: (part of a shared object's path, why).
NEVER_MAPPED = (
    ("cryptography/hazmat/bindings", "Raft's Fernet takes AES from hashlib's libcrypto"),
    ("frozenlist/_frozenlist", "the pure Python FrozenList (meshorch/__init__.py)"),
    ("libstdc++", "loaded by frozenlist's C++ build only"),
)

# VmRSS of a lone static agent running one instance, measured on 2026-12-06 (Python 3.11,
# x86_64, OpenSSL 3.0; kB / 1024 as vm_rss_mb counts, so MiB): 49.0-49.1 in five runs (515
# modules), from 59.7 (560 modules) before Raft's Fernet left cryptography and podman,
# WireGuard, the upgrade launcher and frozenlist's C++ build were left out (70.5 before the
# agent stopped importing the CLI's whole graph). A size check, not a timing: about 1 MiB
# more than today fails it.
RSS_BOUND_MB = 50

APP = {
    "api_version": "meshorch/v1",
    "name": "shop",
    "version": "1",
    "services": [
        {
            "name": "web",
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


def imported_but_never(modules: list[str]) -> list[str]:
    return [
        f"{name} ({why})"
        for name in modules
        for prefix, why in NEVER_IMPORTED
        if name == prefix or name.startswith(prefix + ".")
    ]


def mapped_but_never(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [f"{part} ({why})" for part, why in NEVER_MAPPED if part in maps]


def vm_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def test_an_agent_imports_only_what_its_configuration_uses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modules_file = tmp_path / "modules.txt"
    monkeypatch.setenv(DEBUG_MODULES_ENV, str(modules_file))  # the agent inherits it
    site = LocalSite(hosts=1, site="small", root=tmp_path / "site", log_level="warning")
    site.start()
    try:
        host = site.members[0]
        assert host.pid is not None
        async with site.session(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await wait_ready(session, site.members)
            body = orjson.dumps(APP)
            headers = {"Content-Type": "application/json"}
            async with session.post(f"{host.url}/v1/apps", data=body, headers=headers) as r:
                assert r.status == 200, await r.text()

            async def running() -> bool:
                async with session.get(f"{host.url}/v1/apps/shop?consistency=local") as r:
                    app = await r.json()
                return bool(app["ready"] == 1)

            await until("the instance runs", running, 30)
            async with session.get(f"{host.url}/metrics") as r:  # the agent's own metrics
                assert r.status == 200

        modules_file.unlink(missing_ok=True)  # the one written once serving; now after work
        os.kill(host.pid, signal.SIGUSR1)
        await until("the module list", modules_file.exists, 10)
        modules = modules_file.read_text().split()
        rss_mb = vm_rss_mb(host.pid)
        mapped = mapped_but_never(host.pid)
        print(f"agent: {len(modules)} modules, VmRSS {rss_mb:.1f} MB")
    finally:
        site.stop()
        print(site.logs())

    assert "meshorch.site.agent" in modules and "raft" in modules  # the list is the agent's
    assert imported_but_never(modules) == []
    assert mapped == []
    assert rss_mb < RSS_BOUND_MB, f"agent VmRSS {rss_mb:.1f} MB, bound {RSS_BOUND_MB} MB"
