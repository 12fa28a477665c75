"""Sealing, unsealing and lock-down on a site of three real agents (process runtime):
a restarted host gets the unseal key from its peers; a fully restarted site stays sealed
until `meshorch site unseal`; a lock-down delta stops delivery and new work at once,
survives a full restart, and unlock + unseal restore everything."""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from meshorch.demo.localsite import LocalHost, LocalSite
from tests.secrets.helpers import Driver, app_spec, until

SECRET = [{"name": "db-password", "env": "DB_PASSWORD"}]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshorch", *args], capture_output=True, text=True, timeout=60
    )


async def instance_of(driver: Driver, app: str) -> dict[str, Any] | None:
    try:
        return await driver.instance(app)
    except (ValueError, AssertionError):
        return None


async def says(driver: Driver, app: str, message: str) -> dict[str, Any] | None:
    instance = await instance_of(driver, app)
    if instance is not None and message in instance["message"] and instance["state"] != "running":
        return instance
    return None


async def delivered(driver: Driver, app: str, value: bytes) -> bool:
    instance = await instance_of(driver, app)
    if instance is None or instance["state"] != "running":
        return False
    try:
        return driver.secret_file(instance, "main", "db-password").read_bytes() == value
    except OSError:
        return False


async def all_status(driver: Driver) -> list[dict[str, Any]]:
    return [await driver.status(h) for h in driver.hosts]


async def test_unseal_from_peers_operator_unseal_and_lockdown(
    site: LocalSite, driver: Driver, tmp_path: Path
) -> None:
    await driver.wait_ready()
    await driver.wait_unsealed()
    await driver.apply_app(app_spec("shop", SECRET))
    await driver.put_secret("db-password", b"v1-value-4f1c", 1)
    await until("v1 delivered", lambda: delivered(driver, "shop", b"v1-value-4f1c"))
    kek = await driver.escrow_kek()  # what the hub will hold in escrow

    # One host restarts: it gets the unseal key from a peer, and delivers again.
    instance = await driver.instance("shop")
    restarted = driver.host(instance["host"])
    driver.site.stop_host(restarted)
    driver.site.start_host(restarted)
    await driver.wait_ready()
    await driver.wait_unsealed([restarted])
    assert (await driver.status(restarted))["unsealed_by"].startswith("from h")
    await until("delivered after a restart", lambda: delivered(driver, "shop", b"v1-value-4f1c"))

    # The whole site restarts: nobody has the key, the site stays sealed.
    await driver.restart_all()
    await until("sealed, and says so", lambda: says(driver, "shop", "site sealed"))
    await asyncio.sleep(2.5)  # a few unseal rounds among the peers: nobody can answer
    assert all(s["sealed"] and not s["locked_down"] for s in await all_status(driver))

    # The operator unseals one host; the others get the key from it.
    key_file = tmp_path / "unseal.key"
    key_file.write_text(base64.b64encode(b"w" * 32).decode())
    wrong = cli("site", "unseal", "shop-1", "--agent", driver.hosts[1].api, "--key-file",
                str(key_file))  # fmt: skip
    assert wrong.returncode == 2 and "wrong_key" in wrong.stderr, wrong.stderr
    other_site = cli("site", "unseal", "shop-2", "--agent", driver.hosts[1].api, "--key-file",
                     str(key_file))  # fmt: skip
    assert other_site.returncode == 2 and "serves site 'shop-1'" in other_site.stderr
    key_file.write_text(base64.b64encode(kek).decode() + "\n")
    done = cli("site", "unseal", "shop-1", "--agent", driver.hosts[1].api, "--key-file",
               str(key_file))  # fmt: skip
    assert done.returncode == 0, done.stderr
    await driver.wait_unsealed()
    await until("delivered after unseal", lambda: delivered(driver, "shop", b"v1-value-4f1c"))

    # Lock-down by a signed delta: every host drops its keys at once...
    committed, _ = await driver.deliver([{"op": "site.lockdown"}])

    async def all_locked() -> bool:
        return all(s["locked_down"] and s["sealed"] for s in await all_status(driver))

    await until("every host locked down", all_locked)
    print(f"lock-down: every host sealed {1000 * (time.monotonic() - committed):.0f} ms "
          "after the delta was committed")  # fmt: skip
    # ... the peer routes refuse, nothing new starts, no secret is delivered.
    h2 = driver.host("h2")
    status, answer = await driver.peer_call(
        "POST", driver.hosts[0], "/v1/secrets/unseal-request", {"host_id": "h2"}, by=h2
    )
    assert status == 409 and answer["error"]["code"] == "locked_down", (status, answer)
    await refused(driver, driver.hosts[0], "/v1/secrets/escrow", {"public_key": "ab" * 32})
    await refused(driver, driver.hosts[0], "/v1/secrets/unseal", {"key": b64(kek)})
    await driver.apply_app(app_spec("plain", []))
    await driver.apply_app(app_spec("shop2", SECRET))
    await driver.put_secret("db-password", b"v2-value-77aa", 2)
    await until("plain waits", lambda: says(driver, "plain", "site locked down"))
    await until("shop2 waits", lambda: says(driver, "shop2", "site locked down"))
    instance = await driver.instance("shop")
    assert instance["state"] == "running"  # what ran keeps running, with v1 still
    assert driver.secret_file(instance, "main", "db-password").read_bytes() == b"v1-value-4f1c"
    await until("shop says it cannot update", lambda: _message(driver, "shop", "locked down"))

    # It survives a full restart.
    await driver.restart_all()
    await asyncio.sleep(1.5)
    assert all(s["locked_down"] and s["sealed"] for s in await all_status(driver))
    await until("plain still waits", lambda: says(driver, "plain", "site locked down"))

    # Unlocked (a delta again): work without secrets resumes, secrets wait for an unseal.
    await driver.deliver([{"op": "site.unlock"}])
    await until("plain runs", lambda: _running(driver, "plain"))
    await until("shop2 is sealed", lambda: says(driver, "shop2", "site sealed"))
    assert all(s["sealed"] and not s["locked_down"] for s in await all_status(driver))
    await driver.ok("POST", driver.hosts[2], "/v1/secrets/unseal", {"key": b64(kek)})
    await driver.wait_unsealed()
    await until("shop2 gets v2", lambda: delivered(driver, "shop2", b"v2-value-77aa"))
    await until("shop gets v2", lambda: delivered(driver, "shop", b"v2-value-77aa"))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def refused(driver: Driver, host: LocalHost, path: str, body: object) -> None:
    status, answer = await driver.call("POST", host, path, body)
    assert status == 409 and answer["error"]["code"] == "locked_down", (path, status, answer)


async def _message(driver: Driver, app: str, text: str) -> bool:
    instance = await instance_of(driver, app)
    return instance is not None and text in instance["message"]


async def _running(driver: Driver, app: str) -> bool:
    instance = await instance_of(driver, app)
    return instance is not None and instance["state"] == "running"
