"""Pure parts of the link's TLS pin and replay defence: the link configuration's pin
fields, and the hub's nonce memory (its window, its bound)."""

from __future__ import annotations

from pathlib import Path

import pytest

from central_hub.replay import BUCKET_S, NonceCache, ReplayCacheFull
from meshorch.cli import known_hubs
from meshorch.errors import RemoteInputError
from meshorch.fleet.apply import LinkConfig, check_link_config
from meshorch.fleet.client import normalize_fingerprint

KEY = "11" * 32
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_the_pin_is_validated_normalised_and_kept() -> None:
    colons = ":".join(["AB"] * 32)
    config = check_link_config("https://hub:7900", "acme", KEY, None, "SHA256:" + colons)
    assert config.hub_fingerprint == "ab" * 32
    assert LinkConfig.decode(config.encode()) == config  # stored in the site state
    assert check_link_config("https://hub", "acme", KEY, hub_ca=PEM).hub_ca == PEM
    for fingerprint, ca in (("abc", None), (None, "not a pem"), ("ab" * 32, PEM)):
        with pytest.raises(RemoteInputError, match="hub_"):
            check_link_config("https://hub", "acme", KEY, None, fingerprint, ca)
    with pytest.raises(ValueError):
        normalize_fingerprint("zz" * 32)


def test_nonces_are_refused_twice_and_forgotten_after_the_window() -> None:
    cache = NonceCache(window_s=300)
    now = 1_000_000.0
    assert cache.check_and_add("s1", "n1", now, now)
    assert not cache.check_and_add("s1", "n1", now, now + 299)  # a replay
    assert cache.check_and_add("s2", "n1", now, now)  # another site's nonce
    # Signed ahead of the hub's clock: remembered until its own time plus the window.
    assert cache.check_and_add("s1", "n2", now + 250, now)
    later = now + 300 + 2 * BUCKET_S
    assert cache.check_and_add("s3", "x", later, later)  # expiry runs on every call
    assert len(cache) == 2  # n1 of s1 and s2 dropped, n2 (signed at now+250) kept
    assert not cache.check_and_add("s1", "n2", now + 250, later)


def test_the_memory_is_bounded_by_the_window_and_the_capacity() -> None:
    cache = NonceCache(window_s=300, capacity=1000)
    now = 0.0
    for second in range(3000):  # 50 minutes at 1 request per 3 s from each of 1 site
        now = float(second * 3)
        assert cache.check_and_add("s", f"n{second}", now, now)
    assert len(cache) <= 300 / 3 + 2 * BUCKET_S / 3 + 1
    full = NonceCache(window_s=300, capacity=2)
    full.check_and_add("s", "a", 0, 0)
    full.check_and_add("s", "b", 0, 0)
    with pytest.raises(ReplayCacheFull):
        full.check_and_add("s", "c", 0, 0)
    assert not full.check_and_add("s", "a", 0, 0)  # a replay is still told apart


def test_the_cli_pin_explicit_or_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    known = tmp_path / "cfg" / "known_hubs"
    monkeypatch.delenv(known_hubs.FINGERPRINT_ENV, raising=False)
    known_hubs.check_pin("hub:7900", "aa" * 32, known)
    assert "pinned the hub at hub:7900" in capsys.readouterr().err
    known_hubs.check_pin("hub:7900", "aa" * 32, known)  # the same: quiet
    known_hubs.check_pin("other:7900", "bb" * 32, known)  # another address: its own pin
    with pytest.raises(known_hubs.HubNotTrusted, match=r"CERTIFICATE CHANGED.*remove the line"):
        known_hubs.check_pin("hub:7900", "bb" * 32, known)
    monkeypatch.setenv(known_hubs.FINGERPRINT_ENV, "SHA256:" + ":".join(["CC"] * 32))
    known_hubs.check_pin("new:1", "cc" * 32, known)  # explicit: no first-use trust
    with pytest.raises(known_hubs.HubNotTrusted, match="MESHORCH_HUB_FINGERPRINT"):
        known_hubs.check_pin("new:1", "aa" * 32, known)
    assert "new:1" not in known.read_text()
