"""The fleet link's records in the site state, read: link configuration, trust, site key,
the envelopes applied last.

Shared by the link (``meshorch.fleet.site_link``) and the agent upgrades
(``meshorch.fleet.upgrade``, which fetch a release from the hub with the site's key).
"""

from __future__ import annotations

from typing import Any

import orjson
from nacl.signing import SigningKey

from meshorch.fleet.apply import (
    APPLIED_KEEP,
    APPLIED_PREFIX,
    LINK_KEY,
    REJECTIONS_KEY,
    SITE_KEY_KEY,
    TRUST_KEY,
    LinkConfig,
    SiteKey,
    applied_key,
    applied_version,
    decode_rejections,
)
from meshorch.fleet.client import HubTrust
from meshorch.fleet.delta import TrustState
from meshorch.state.ports import SiteState
from meshorch.state.tables import SYSTEM_TABLE


class LinkRecords:
    def __init__(self, site: SiteState) -> None:
        self.site = site
        self._trust_cache: tuple[bytes | None, frozenset[str]] = (None, frozenset())

    def _get(self, key: bytes) -> bytes | None:
        record = self.site.view.get(SYSTEM_TABLE, key)
        return None if record is None else record.value

    def link_config(self) -> LinkConfig | None:
        raw = self._get(LINK_KEY)
        return None if raw is None else LinkConfig.decode(raw)

    def hub_url(self) -> str | None:
        config = self.link_config()
        return None if config is None else config.hub

    def hub_trust(self) -> HubTrust:
        config = self.link_config()
        return HubTrust() if config is None else config.trust_tls

    def trust_state(self) -> TrustState | None:
        raw = self._get(TRUST_KEY)
        return None if raw is None else TrustState.from_json(orjson.loads(raw))

    def trusted_keys(self) -> frozenset[str]:
        """The root keys the trust state trusts (the gossip trust anchors); the same
        object while the trust record does not change."""
        raw = self._get(TRUST_KEY)
        cached_raw, keys = self._trust_cache
        if raw != cached_raw:
            keys = frozenset()
            if raw is not None:
                keys = TrustState.from_json(orjson.loads(raw)).trusted_keys
            self._trust_cache = (raw, keys)
        return keys

    def site_key(self) -> SigningKey | None:
        raw = self._get(SITE_KEY_KEY)
        return None if raw is None else SigningKey(SiteKey.decode(raw).seed)

    def rejections(self) -> list[dict[str, Any]]:
        return decode_rejections(self._get(REJECTIONS_KEY))

    def applied_envelopes(self, after: int) -> list[tuple[int, bytes]]:
        """The kept envelopes (``apply.APPLIED_KEEP``) of the versions after ``after``."""
        records, _ = self.site.view.scan(
            SYSTEM_TABLE, APPLIED_PREFIX, APPLIED_KEEP, start=applied_key(after + 1)
        )
        return [(applied_version(key), record.value) for key, record in records]
