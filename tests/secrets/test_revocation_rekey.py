"""Revoking a host rekeys the site, on three real agents (process runtime, loopback).

The revoked host's unseal key is captured before it is revoked, as a thief holding it
would have it, and its data dir is read afterwards, as a thief would. After the revocation
the site has a new unseal key (KEK) and site secrets key (SSK), the old KEK opens no
wrapped record of the remaining hosts' state, every secret still reaches containers on the
remaining hosts, a remaining host restarted afterwards unseals from a peer, and the revoked
host's unseal requests are refused. Each refusal is paired with the call that succeeds."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey

from meshorch.demo.localsite import LocalHost
from meshorch.secrets.keyring import (
    SSK_CONTEXT,
    Indexed,
    Snapshot,
    Tampered,
    dk_context,
    open_sealed,
    previous_ssk_context,
    seal,
    secret_context,
    unwrap,
)
from meshorch.state.tables import SECRETS_TABLE, SITE_TABLES
from raft.view import StateView
from tests.secrets.helpers import Driver, app_spec, until

UNSEAL = "/v1/secrets/unseal-request"


def stored_snapshot(data_dir: Path) -> Snapshot:
    """The secrets table in a stopped host's data dir: what a thief holding it reads."""
    view = StateView(data_dir / "raft" / "view", SITE_TABLES)
    try:
        records, _ = view.scan(SECRETS_TABLE, b"", 1_000_000)
        return Snapshot.read((k, Indexed(r.mod_index, r.value)) for k, r in records)
    finally:
        view.close()


def opened_by(kek: bytes, snap: Snapshot) -> list[str]:
    """The wrapped records of ``snap`` that ``kek`` opens."""
    assert snap.keyring is not None
    blobs = [(SSK_CONTEXT, snap.keyring.ssk_wrapped)]
    blobs += [(previous_ssk_context(p.public), p.wrapped) for p in snap.keyring.previous]
    blobs += [(dk_context(d.id), d.wrapped) for d in snap.dks.values()]
    opened = []
    for context, blob in blobs:
        try:
            unwrap(kek, context, blob)
            opened.append(context)
        except Tampered:
            pass
    return opened


async def unseal_request(
    driver: Driver, to: LocalHost, host_id: str, by: LocalHost
) -> tuple[int, dict[str, Any]]:
    return await driver.peer_call("POST", to, UNSEAL, {"host_id": host_id}, by=by)


async def kek_of(driver: Driver, host: LocalHost) -> bytes:
    """The unseal key in ``host``'s memory (asked as an admin, through its escrow route)."""
    mine = PrivateKey.generate()
    body = {"public_key": bytes(mine.public_key).hex()}
    answer = await driver.ok("POST", host, "/v1/secrets/escrow", body)
    return open_sealed(mine, base64.b64decode(answer["sealed_key"]))


async def file_on(driver: Driver, app: str, value: bytes, hosts: set[str]) -> bool:
    try:
        instance = await driver.instance(app)
    except (ValueError, AssertionError):
        return False
    if instance["state"] != "running" or instance["host"] not in hosts:
        return False
    try:
        return driver.secret_file(instance, "main", "db-password").read_bytes() == value
    except OSError:
        return False


async def test_revoking_a_host_rekeys_the_site(driver: Driver) -> None:
    await driver.wait_ready()
    await driver.wait_unsealed()
    h1, h2, h3 = driver.hosts
    await driver.apply_app(app_spec("shop", [{"name": "db-password"}]))
    await driver.put_secret("db-password", b"v1-before", 1)
    await until("v1 delivered", lambda: file_on(driver, "shop", b"v1-before", {"h1", "h2", "h3"}))
    before = await driver.status(h1)
    assert before["keyring_generation"] == 1

    # A host asks for its own unseal key only; h3 still may.
    status, answer = await unseal_request(driver, h1, "h3", by=h2)
    assert status == 403 and answer["error"]["code"] == "not_the_requester", answer
    status, answer = await unseal_request(driver, h1, "h2", by=h2)
    assert status == 200 and "sealed_key" in answer
    status, answer = await unseal_request(driver, h1, "h3", by=h3)
    assert status == 200 and "sealed_key" in answer

    # What the host to be revoked holds in memory: the unseal key.
    old_kek = await kek_of(driver, h3)

    async with driver.session.delete(f"{h1.url}/v1/members/h3") as response:
        assert response.status == 200, await response.text()
    driver.site.stop_host(h3)
    stolen = stored_snapshot(h3.data_dir)
    assert stolen.keyring is not None and stolen.keyring.generation == 1
    old_ssk = stolen.keyring.open(old_kek)  # the thief's site key
    assert bytes(old_ssk.public_key).hex() == before["public_key"]
    remaining = [h1, h2]

    async def rekeyed() -> bool:
        for host in remaining:
            status = await driver.status(host)
            if status["sealed"] or status["keyring_generation"] != 2:
                return False
            if status["data_keys"] != [status["current_data_key"]]:
                return False  # the secrets are not all under the new data key yet
        return True

    await until("the remaining hosts rekeyed and unsealed", rekeyed, 30)
    after = [await driver.status(h) for h in remaining]
    assert {s["public_key"] for s in after} != {before["public_key"]}
    assert after[0]["previous_public_keys"] == [before["public_key"]]
    assert after[0]["current_data_key"] > before["current_data_key"]
    # None needed an operator or a peer's answer: the leader handed the key over.
    assert all(s["unsealed_by"].startswith("rekeyed") for s in after), after

    # The revoked host's own unseal request is refused (its signature no longer counts);
    # the same request by a remaining host for itself is answered.
    status, answer = await unseal_request(driver, h1, "h3", by=h3)
    assert status == 401 and answer["error"]["code"] == "peer_only", answer
    status, answer = await unseal_request(driver, h1, "h2", by=h2)
    assert status == 200 and "sealed_key" in answer

    # Every secret still reaches a container on a remaining host, and a new version,
    # sealed to the new site key, does too; the thief's site key does not open it.
    await until(
        "v1 on a remaining host", lambda: file_on(driver, "shop", b"v1-before", {"h1", "h2"})
    )
    new_public = bytes.fromhex(after[0]["public_key"])
    blob = seal(new_public, b"v2-after")
    with pytest.raises(Tampered):
        open_sealed(old_ssk, blob)
    await driver.put_secret("db-password", b"v2-after", 2)
    await until("v2 delivered", lambda: file_on(driver, "shop", b"v2-after", {"h1", "h2"}), 30)

    # A remaining host restarted after the rekey: its stored state opens with nothing
    # the revoked host knew, and it unseals from its peer.
    instance = await driver.instance("shop")
    other = next(h for h in remaining if h.host_id != instance["host"])
    new_kek = await kek_of(driver, other)
    driver.site.stop_host(other)
    stored = stored_snapshot(other.data_dir)
    assert stored.keyring is not None and stored.keyring.generation == 2
    assert opened_by(old_kek, stored) == []
    assert len(opened_by(new_kek, stored)) == 2 + len(stored.dks)  # SSK, old SSK, data keys
    assert open_sealed(stored.keyring.open(new_kek), blob) == b"v2-after"
    assert "h3" not in stored.hostkeys
    for secret, _ in stored.secrets.values():
        context = secret_context(secret.tenant, secret.name, secret.version)
        with pytest.raises(Tampered):
            unwrap(old_kek, context, secret.ciphertext)
    assert secret.state == "ready" and secret.dk == after[0]["current_data_key"]
    driver.site.start_host(other)
    await driver.wait_unsealed(remaining)
    status = await driver.status(other)
    assert status["unsealed_by"].startswith("from h"), status
    assert status["public_key"] == after[0]["public_key"]
