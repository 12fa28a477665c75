"""Secrets delivered by signed deltas reach instances of a site of three real agents
(process runtime), survive rotations on demand and on schedule, and no value is ever
written in plaintext (raw, base64 or hex) under a data dir or in a log."""

from __future__ import annotations

import os
import secrets
import signal
import statistics
import time

from meshorch.demo.localsite import LocalSite
from tests.secrets.helpers import Driver, app_spec, scan_for, until


async def test_delivery_rotation_and_no_plaintext(site: LocalSite, driver: Driver) -> None:
    await driver.wait_ready()
    await driver.wait_unsealed()
    statuses = [await driver.status(h) for h in driver.hosts]
    assert len({s["public_key"] for s in statuses}) == 1 and statuses[0]["data_keys"] == [1]
    fleet = await driver.ok("GET", driver.hosts[1], "/v1/fleet")
    assert fleet["secrets_public_key"] == statuses[0]["public_key"]

    # The app first: its instance waits for the secret and says so.
    secret_refs = [
        {"name": "db-password", "env": "DB_PASSWORD"},
        {"name": "tls-key", "file": "tls/key.bin"},
    ]
    await driver.apply_app(app_spec("shop", secret_refs))
    instance = await until(
        "the instance waits for its secret",
        lambda: _waiting(driver, "waiting for secret default/db-password"),
    )
    assert instance["state"] != "running"

    values: list[bytes] = []
    tls_key = os.urandom(48)  # binary: a file only
    values.append(tls_key)
    await driver.put_secret("tls-key", tls_key, 1)
    latencies = []
    for version in range(1, 7):
        value = secrets.token_urlsafe(24).encode()
        values.append(value)
        committed = await driver.put_secret("db-password", value, version)
        instance = await driver.instance("shop")
        path = driver.secret_file(instance, "main", "db-password")
        await until(f"version {version} delivered", lambda p=path, v=value: _holds(p, v))
        latencies.append(time.monotonic() - committed)
    median_ms = statistics.median(latencies) * 1000
    print(f"secret delivery, delta commit to file present: median {median_ms:.0f} ms, "
          f"max {max(latencies) * 1000:.0f} ms over {len(latencies)} versions")  # fmt: skip
    assert median_ms < 3000

    instance = await until("the instance runs", lambda: _running(driver))
    db_file = driver.secret_file(instance, "main", "db-password")
    tls_file = driver.secret_file(instance, "main", "tls/key.bin")
    assert db_file.read_bytes() == values[-1] and tls_file.read_bytes() == tls_key
    assert oct(db_file.stat().st_mode & 0o777) == "0o400"
    assert oct(db_file.parent.stat().st_mode & 0o777) == "0o700"

    def environ() -> dict[str, str]:
        return driver.environ(driver.instance_pid(instance, "main"))

    await until("the env var", lambda: environ().get("DB_PASSWORD") == values[-1].decode())
    assert environ()["MESHORCH_SECRETS_DIR"] == str(db_file.parent)
    listed = await driver.ok("GET", driver.hosts[2], "/v1/secrets")
    assert {(s["name"], s["version"], s["state"]) for s in listed["secrets"]} == {
        ("db-password", 6, "ready"), ("tls-key", 1, "ready"),
    }  # fmt: skip

    # Rotation on demand: every secret moves to the new key, the old one is deleted...
    rotated = await driver.ok("POST", driver.hosts[1], "/v1/secrets/rotate", {})
    assert rotated == {"rotated": True, "current_data_key": 2}
    listed = await driver.ok("GET", driver.hosts[0], "/v1/secrets")
    assert {s["data_key"] for s in listed["secrets"]} == {2}
    assert (await driver.status(driver.hosts[0]))["data_keys"] == [2]
    # ... and every secret is still readable: a restarted instance gets them again.
    await _restart_instance(driver, values[-1], tls_key)

    # Rotation on a schedule (a short interval here): two rotations, one key left.
    await driver.ok("PUT", driver.hosts[0], "/v1/secrets/settings", {"rotation_interval_s": 1})

    async def rotated_twice() -> bool:
        status = await driver.status(driver.hosts[0])
        return status["current_data_key"] >= 4 and status["data_keys"] == [
            status["current_data_key"]
        ]

    await until("two scheduled rotations", rotated_twice, timeout_s=15)
    await driver.ok("PUT", driver.hosts[0], "/v1/secrets/settings", {"rotation_interval_s": 3600})
    await _restart_instance(driver, values[-1], tls_key)

    # The secret files go with the instance.
    instance = await until("the instance runs", lambda: _running(driver))
    delivered_dir = driver.secret_file(instance, "main", "db-password").parent
    assert delivered_dir.is_dir()
    await driver.ok("DELETE", driver.hosts[0], "/v1/apps/shop")
    await until("the secret files are removed", lambda: not delivered_dir.exists())

    # Enough other writes (one key, overwritten) for every host to compact its log.
    filler = os.urandom(300_000)
    for _ in range(12):
        async with driver.session.put(f"{driver.hosts[0].url}/v1/kv/filler", data=filler):
            pass
    dumps = [h.data_dir / "raft" / "raft.dump" for h in driver.hosts]
    await until("every host wrote a dump", lambda: all(d.exists() for d in dumps))

    # No plaintext: not in any file of any data dir (Raft journal, dumps, LMDB, runtime
    # state), nor in the agents' logs. The KEK is nowhere either.
    kek = await driver.escrow_kek()
    site.stop()
    assert site.root is not None
    found = scan_for([site.root], [*values, kek])
    assert found == [], found
    scanned = sum(1 for p in site.root.rglob("*") if p.is_file())
    print(f"no plaintext in {scanned} files under {site.root}")
    # The scan does see what is there: the secret records, and a host's own key file.
    host_key = bytes.fromhex((driver.hosts[0].data_dir / "secrets-host.key").read_text())
    assert scan_for([driver.hosts[0].data_dir], [host_key]) != []
    for dump in dumps:
        assert b"secret/default/db-password" in dump.read_bytes()


async def _waiting(driver: Driver, message: str) -> dict[str, object] | None:
    instance = await driver.instance("shop")
    return instance if message in str(instance["message"]) else None


async def _running(driver: Driver) -> dict[str, object] | None:
    instance = await driver.instance("shop")
    return instance if instance["state"] == "running" else None


def _holds(path: os.PathLike[str], value: bytes) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read() == value
    except OSError:
        return False


async def _restart_instance(driver: Driver, db_value: bytes, tls_key: bytes) -> None:
    """Kill the instance with its files gone: it comes back with both, exact."""
    instance = await until("the instance runs", lambda: _running(driver))
    db_file = driver.secret_file(instance, "main", "db-password")
    tls_file = driver.secret_file(instance, "main", "tls/key.bin")
    db_file.unlink()
    tls_file.unlink()
    os.kill(driver.instance_pid(instance, "main"), signal.SIGKILL)
    await until("the instance restarted with its secrets", lambda: _holds(db_file, db_value))
    assert tls_file.read_bytes() == tls_key
