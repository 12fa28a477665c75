"""The hub's key files at rest are sealed with the operator's KEK (central_hub.keyfiles):
no key material on disk, a start without the right KEK refused saying why, plain-text data
dirs sealed at the first start with a KEK, rotate-kek crash-safe and refused while the hub
runs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import aiohttp
import pytest
from nacl.signing import SigningKey

from central_hub import Hub, HubConfigError, keyfiles, tls
from central_hub import cli as hub_cli
from central_hub.keyfiles import PENDING_SUFFIX, ROTATION_MARKER, Kek, key_files, new_kek_file
from meshorch.demo.localsite import LocalHub
from tests.hub.conftest import admin_token, hub_config
from tests.hub.helpers import Operator

SECRET = {"name": "db-password", "value": "hunter2", "tenant": "default"}


async def run_hub(data_dir: Path, kek: Kek | None, rotate_root: bool = False) -> dict[str, str]:
    """Start and stop a hub; returns the raw hex of its keys read through the hub."""
    async with Hub(hub_config(data_dir, kek=kek)) as hub:
        if rotate_root:
            async with aiohttp.ClientSession() as session:
                admin = Operator(session, hub.url, admin_token(hub))
                await admin.ok("POST", "/v1/fleet/rotate")
                await admin.ok("POST", "/v1/secrets", SECRET, 201)
        assert hub.gossip is not None
        keys = hub.vault.keys
        return {
            "root": bytes(hub.ledger.signing_keys[0]).hex(),
            "master": keys.master.hex(),
            "escrow": bytes(keys.escrow).hex(),
            "gossip": bytes(hub.gossip._key).hex(),
        }


def on_disk(data_dir: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(data_dir.rglob("*")) if path.is_file())


def assert_sealed(data_dir: Path, kek: Kek, raw_keys: dict[str, str]) -> None:
    files = key_files(data_dir)
    names = {path.name for path in files}
    assert {"fleet-root.key", "secrets.key", "escrow.key", "gossip.key"} <= names
    for path in files:
        assert path.read_text().startswith(f"meshorch-sealed-key 1 kek={kek.id}\n"), path
    blob = on_disk(data_dir)
    for name, hex_key in raw_keys.items():
        raw = bytes.fromhex(hex_key)
        assert hex_key.encode() not in blob and hex_key.upper().encode() not in blob, name
        assert raw not in blob, name


async def test_key_files_are_sealed_and_a_start_needs_the_right_kek(tmp_path: Path) -> None:
    data_dir = tmp_path / "hub"
    kek = new_kek_file(tmp_path / "hub.kek")
    first = await run_hub(data_dir, kek, rotate_root=True)
    assert any(p.name.endswith(".retired") for p in key_files(data_dir))
    assert_sealed(data_dir, kek, first)
    assert await run_hub(data_dir, kek) == first  # the same keys open again

    with pytest.raises(HubConfigError, match=r"escrow.key is sealed by KEK .* no KEK was given"):
        await run_hub(data_dir, None)
    wrong = new_kek_file(tmp_path / "wrong.kek")
    with pytest.raises(HubConfigError, match=rf"sealed by KEK {kek.id}, not .*{wrong.id}.*wrong"):
        await run_hub(data_dir, wrong)


def test_the_cli_refuses_with_the_reason_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(keyfiles.KEK_ENV, raising=False)
    data_dir = tmp_path / "hub"
    kek_path = tmp_path / "hub.kek"
    kek = new_kek_file(kek_path)
    data_dir.mkdir()
    keyfiles.write_key_text(data_dir / "secrets.key", os.urandom(32).hex(), kek)
    base = ["--data-dir", str(data_dir), "--listen", "127.0.0.1:0", "--no-gossip"]
    assert hub_cli.main([*base, "--insecure-no-kek"]) == 2
    assert "secrets.key is sealed by KEK" in capsys.readouterr().err
    wrong = tmp_path / "wrong.kek"
    new_kek_file(wrong)
    assert hub_cli.main([*base, "--kek-file", str(wrong)]) == 2
    assert "wrong KEK" in capsys.readouterr().err
    monkeypatch.setenv(keyfiles.KEK_ENV, "not a key")
    assert hub_cli.main(base) == 2
    assert "$MESHORCH_HUB_KEK: not a KEK" in capsys.readouterr().err
    monkeypatch.setenv(keyfiles.KEK_ENV, kek_path.read_text().strip())
    assert hub_cli.main([*base, "--kek-file", str(kek_path)]) == 2
    assert "give one of" in capsys.readouterr().err


async def test_a_plain_text_data_dir_is_sealed_at_the_first_start_with_a_kek(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "hub"
    plain = await run_hub(data_dir, None)
    assert (data_dir / "fleet-root.key").read_text().strip() == plain["root"]
    kek = new_kek_file(tmp_path / "hub.kek")
    with caplog.at_level(logging.WARNING, logger="central_hub.keyfiles"):
        assert await run_hub(data_dir, kek) == plain
    assert "sealed 4 plain-text key file(s)" in caplog.text
    assert_sealed(data_dir, kek, plain)


def rotate_kek(data_dir: Path, old: Path, new: Path) -> int:
    argv = ["rotate-kek", "--data-dir", str(data_dir), "--old", str(old), "--new", str(new)]
    return hub_cli.main(argv, prog="meshorch hub")


async def test_rotate_kek_reseals_and_the_old_kek_opens_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "hub"
    old_path, new_path = tmp_path / "old.kek", tmp_path / "new.kek"
    old, new = new_kek_file(old_path), new_kek_file(new_path)
    keys = await run_hub(data_dir, old, rotate_root=True)
    assert rotate_kek(data_dir, old_path, new_path) == 0
    assert_sealed(data_dir, new, keys)
    with pytest.raises(HubConfigError, match="wrong KEK"):
        keyfiles.check_open(data_dir, old)
    assert await run_hub(data_dir, new) == keys
    assert rotate_kek(data_dir, old_path, new_path) == 2  # the old KEK opens nothing now


@pytest.mark.parametrize("marker", [False, True], ids=["before-marker", "after-marker"])
async def test_a_rotation_interrupted_by_a_crash_recovers(tmp_path: Path, marker: bool) -> None:
    data_dir = tmp_path / "hub"
    old_path, new_path = tmp_path / "old.kek", tmp_path / "new.kek"
    old, new = new_kek_file(old_path), new_kek_file(new_path)
    keys = await run_hub(data_dir, old)
    files = key_files(data_dir)
    # the crash: the .kek-new files written (and the marker, or not); one renamed already
    for path in files:
        text = keyfiles.read_key_text(path, old)
        pending = path.with_name(path.name + PENDING_SUFFIX)
        pending.write_text(keyfiles.seal_text(text, new))
    if marker:
        (data_dir / ROTATION_MARKER).write_text(new.id + "\n")
        os.replace(data_dir / ("secrets.key" + PENDING_SUFFIX), data_dir / "secrets.key")
        with pytest.raises(HubConfigError, match=f"middle of a KEK rotation to KEK {new.id}"):
            await run_hub(data_dir, old)
        assert await run_hub(data_dir, new) == keys  # the start finishes it
    else:
        assert await run_hub(data_dir, old) == keys  # the start discards the .kek-new files
        assert rotate_kek(data_dir, old_path, new_path) == 0
    assert not list(data_dir.glob("*" + PENDING_SUFFIX))
    assert not (data_dir / ROTATION_MARKER).exists()
    assert_sealed(data_dir, new, keys)


async def test_rotate_kek_is_refused_while_the_hub_runs(tmp_path: Path) -> None:
    data_dir = tmp_path / "hub"
    old_path, new_path = tmp_path / "old.kek", tmp_path / "new.kek"
    old = new_kek_file(old_path)
    new_kek_file(new_path)
    async with Hub(hub_config(data_dir, kek=old, gossip=False)):
        assert rotate_kek(data_dir, old_path, new_path) == 2
    assert {p.read_text().split()[2] for p in key_files(data_dir)} == {f"kek={old.id}"}


async def test_meshorch_hub_without_a_kek_uses_a_kek_file_beside_the_data_dir(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "hub"
    hub = LocalHub(data_dir, fleet="kek", extra_args=["--no-gossip"])
    hub.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            root_key = await hub.wait_ready(session)
    finally:
        hub.stop()
    kek_path = tmp_path / "hub.kek"
    assert oct(kek_path.stat().st_mode & 0o777) == "0o600"
    kek = keyfiles.read_kek_file(kek_path)
    root = keyfiles.read_key_text(data_dir / "fleet-root.key", kek)
    assert SigningKey(bytes.fromhex(root)).verify_key.encode().hex() == root_key
    assert "NO KEK GIVEN" in hub.logs()


async def test_the_self_signed_tls_key_is_sealed_and_served(tmp_path: Path) -> None:
    """A copy of the data dir holds no TLS private key (it would impersonate the hub to
    every site pinned on its certificate); the hub still serves that certificate."""
    data_dir = tmp_path / "hub"
    kek = new_kek_file(tmp_path / "hub.kek")
    config = hub_config(data_dir, kek=kek, insecure_http=False, gossip=False)
    async with Hub(config) as hub:
        first = hub.tls_fingerprint
        assert first is not None
        fingerprint = aiohttp.Fingerprint(bytes.fromhex(first))
        async with (
            aiohttp.ClientSession() as session,
            session.get(hub.url + "/v1/fleet", ssl=fingerprint) as response,
        ):
            assert response.status == 200
    key_text = (data_dir / "tls.key").read_text()
    assert key_text.startswith(f"meshorch-sealed-key 1 kek={kek.id}\n")
    assert b"PRIVATE KEY" not in on_disk(data_dir)
    async with Hub(config) as hub:
        assert hub.tls_fingerprint == first  # the sealed key opens: the same certificate
    with pytest.raises(HubConfigError, match=r"escrow.key is sealed by KEK .* no KEK was given"):
        async with Hub(hub_config(data_dir, insecure_http=False, gossip=False)):
            pass
    with pytest.raises(HubConfigError, match=r"tls.key is sealed by KEK .* no KEK was given"):
        tls.load(data_dir, None, None, "127.0.0.1", None)
    wrong = new_kek_file(tmp_path / "wrong.kek")
    with pytest.raises(HubConfigError, match=r"tls.key is sealed by KEK .*wrong KEK"):
        tls.load(data_dir, None, None, "127.0.0.1", wrong)


async def test_a_plain_tls_key_of_an_older_hub_is_sealed_at_the_next_start(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "hub"
    async with Hub(hub_config(data_dir, insecure_http=False, gossip=False)) as hub:
        plain = hub.tls_fingerprint
    assert "PRIVATE KEY" in (data_dir / "tls.key").read_text()
    kek = new_kek_file(tmp_path / "hub.kek")
    async with Hub(hub_config(data_dir, kek=kek, insecure_http=False, gossip=False)) as hub:
        assert hub.tls_fingerprint == plain
    assert b"PRIVATE KEY" not in on_disk(data_dir)
