"""``VaultService`` on its own: a ledger over a real store in a tmp dir, no ``Hub``."""

from __future__ import annotations

import base64
from pathlib import Path

from nacl.public import PrivateKey

from central_hub.vault import (
    ESCROW_KEY_FILE,
    MASTER_KEY_FILE,
    parse_report_secrets,
    secret_record_key,
)
from central_hub.vault import parse_secret_request as secret
from central_hub.vault_service import VaultService
from meshorch.fleet.delta import parse
from meshorch.secrets.keyring import open_sealed
from tests.hub.test_parts import Clock, admin, open_ledger, parts, report


async def test_a_secret_waits_for_the_site_key_then_is_sealed_to_it(tmp_path: Path) -> None:
    clock = Clock()
    ledger = open_ledger(tmp_path / "hub", clock)
    _, reports, _, sites = parts(ledger)
    vault = VaultService(ledger, reports)
    vault.open()
    assert (tmp_path / "hub" / MASTER_KEY_FILE).exists()
    assert (tmp_path / "hub" / ESCROW_KEY_FILE).exists()
    await sites.register_site("s1", {}, "ab" * 32)
    root = admin(clock())

    status, made = await vault.put_secret(root, secret({"name": "db", "value": "pw"}))
    assert status == 201 and made["targets"] == ["s1"] and made["version"] == 1
    assert ledger.head.version == 0  # the site has no secrets key yet
    assert not vault.needs_distribution()

    site_key = PrivateKey.generate()
    keyed = parse_report_secrets({"secrets_public_key": bytes(site_key.public_key).hex()})
    await reports.record("s1", {**report("s1", 0, clock()), **keyed})
    assert vault.needs_distribution()
    await ledger.transact(vault.distribute)
    assert not vault.needs_distribution()

    [(_, envelope)] = ledger.deltas_after(0, 10)
    delta = parse(envelope)[0]
    [op] = delta.ops
    assert op["op"] == "secret.put" and delta.target.sites == frozenset({"s1"})
    assert open_sealed(site_key, base64.b64decode(op["sealed"]["s1"])) == b"pw"
    kept = ledger.store.get_json("meta", secret_record_key("default", "db"))
    assert kept["issued"]["s1"] == {"version": 1, "key": keyed["secrets_public_key"],
                                    "delta": delta.version}  # fmt: skip
    assert [s["name"] for s in vault.list_secrets(root)] == ["db"]

    await ledger.drain()
    await ledger.close_store()
