"""Configuration checks and the crash-safe root key files."""

from __future__ import annotations

from pathlib import Path

import pytest
from nacl.signing import SigningKey

from central_hub import HubConfig, HubConfigError
from central_hub.deltalog import (
    KEY_FILE,
    NEW_KEY_FILE,
    recover_root_key,
    retired_name,
    write_secret_file,
)
from meshorch.fleet.delta import key_id


def test_config_lists_every_problem(tmp_path: Path) -> None:
    HubConfig(data_dir=tmp_path).validate()
    assert HubConfig(data_dir=tmp_path, delta_ttl_s=400).heartbeat_interval_s == 100
    config = HubConfig(
        data_dir=tmp_path, port=70000, fleet="Bad Name", wave_timeout_s=0, heartbeat_s=10.0,
        delta_ttl_s=5.0,
    )  # fmt: skip
    with pytest.raises(HubConfigError) as info:
        config.validate()
    for fragment in ("port", "fleet", "wave_timeout_s", "heartbeat_s"):
        assert fragment in str(info.value)


def _write(path: Path, key: SigningKey) -> None:
    write_secret_file(path, bytes(key).hex())


def test_an_interrupted_rotation_is_finished(tmp_path: Path) -> None:
    old, new = SigningKey.generate(), SigningKey.generate()
    _write(tmp_path / KEY_FILE, old)
    _write(tmp_path / NEW_KEY_FILE, new)
    # the store says the rotation committed: the new key is the root
    assert key_id(recover_root_key(tmp_path, key_id(new), 1)) == key_id(new)
    assert (tmp_path / retired_name(1)).read_text() == bytes(old).hex()
    assert not (tmp_path / NEW_KEY_FILE).exists()


def test_an_uncommitted_rotation_is_discarded(tmp_path: Path) -> None:
    old, new = SigningKey.generate(), SigningKey.generate()
    _write(tmp_path / KEY_FILE, old)
    _write(tmp_path / NEW_KEY_FILE, new)
    assert key_id(recover_root_key(tmp_path, key_id(old), 0)) == key_id(old)
    assert not (tmp_path / NEW_KEY_FILE).exists()


def test_a_wrong_key_file_is_a_clear_error(tmp_path: Path) -> None:
    _write(tmp_path / KEY_FILE, SigningKey.generate())
    with pytest.raises(HubConfigError, match="restore the right key file"):
        recover_root_key(tmp_path, "ab" * 32, 0)
