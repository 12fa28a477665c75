"""The hub's gossip member: a relay for sites behind NAT, and a source of fresh summaries.

The hub is the member ``"hub"`` (``relay=True``: reachable by everyone, it forwards probes
to NATed sites), signing with its own Ed25519 gossip key (``DATA_DIR/gossip.key``, 0600)
under a certificate issued by the fleet root key, renewed before it expires and reissued
when the root key rotates. It accepts datagrams whose certificate the current root key
signed: those of the hub itself and of the sites (``certificate_for``, served by
``GET /v1/link/gossip``), a site's only under a certificate of the key the hub holds for it
(``SiteKeyOpener``: a certificate of a key the site rotated away from opens nothing).

What it does with them:

- site summaries are checked against the site's registered key (the summary is signed
  end to end, so a site relaying another's summary cannot alter it) by the gossip core
  itself (``summary_verifier``), before it stores or passes one on: a forged one cannot
  displace the genuine one. Those that pass (``summary_changed`` events) must be newer
  by the site's clock than the last one kept and not from the future, and are kept in
  memory (one per registered site) with their receive time for the fleet view; bad ones
  are counted in ``stats`` and ignored;
- it publishes its own summary ``{"v": 1, "t": T, "head": N, "hh": HASH16}`` on every
  append to the delta log, so sites learn of new deltas even when their link is down;
- it answers a site's request for the deltas after a version with the envelopes that fit
  an app message (``meshorch.fleet.gossip``), at most one burst per requester per 0.5 s.

Every callback runs inside the event loop's datagram handling and never raises.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import orjson
from nacl.signing import SigningKey

from central_hub import deltalog
from central_hub.keyfiles import Kek, write_key_text
from central_hub.ledger import Ledger
from gossip import (
    BadCertError,
    DatagramOpener,
    DatagramSealer,
    Event,
    EventKind,
    GossipService,
    MemberState,
    SummaryVerifier,
    address_meta,
    issue_cert,
)
from gossip.auth import Opened
from gossip.messages import Summary
from meshorch.fleet.client import Address, format_address
from meshorch.fleet.gossip import (
    ANSWER_INTERVAL_S,
    HUB_ID,
    MAX_ANSWER_DELTAS,
    MAX_APP_BYTES,
    MSG_REQUEST,
    BadSummary,
    RateLimit,
    delta_messages,
    gossip_config,
    hub_summary,
    open_summary,
    parse_request,
    parse_site_summary,
    summary_signer,
    summary_verifier,
)

logger = logging.getLogger(__name__)

GOSSIP_KEY_FILE = "gossip.key"
MAX_PEERS = 64  # peers named in one GET /v1/link/gossip answer
FUTURE_SKEW_S = 60.0  # a summary stamped further ahead of the hub's clock is refused


@dataclass(slots=True)
class HubGossipStats:
    summaries: int = 0  # site summaries kept
    bad_summaries: int = 0  # malformed, unsigned, unknown site, from the future
    old_summaries: int = 0  # not newer than the one kept (replays, reordering)
    bad_messages: int = 0
    requests_answered: int = 0
    deltas_sent: int = 0
    certificates: int = 0  # issued to sites

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class SiteKeyOpener(DatagramOpener):
    """Also drops a registered site's datagrams under a certificate of a key other than the
    one the hub holds for it: after the site rotated its key (a revoked host kept the old
    one), a certificate issued for the old key opens nothing at the hub."""

    def __init__(
        self,
        trusted_anchors: Callable[[], frozenset[str]],
        site_key: Callable[[str], str | None],
        *,
        recipient: str,
    ) -> None:
        super().__init__(trusted_anchors, recipient=recipient)
        self._site_key = site_key

    def open(self, data: bytes, now: float) -> Opened:
        opened = super().open(data, now)
        sender = opened.sender_id
        if sender != HUB_ID:
            registered = self._site_key(sender)
            certified = self.member_key(sender, now)
            if registered is not None and (certified is None or certified.hex() != registered):
                raise BadCertError(f"the certificate of {sender[:64]!r} is for a key it left")
        return opened


def load_or_create_gossip_key(data_dir: Path, kek: Kek | None = None) -> SigningKey:
    path = data_dir / GOSSIP_KEY_FILE
    if path.exists():
        return deltalog.read_key(path, kek, "hub gossip key")
    key = SigningKey.generate()
    write_key_text(path, bytes(key).hex() + "\n", kek)
    logger.info("created the hub's gossip key %s", path)
    return key


class HubGossip:
    """The hub's member; ``start``/``stop`` are called by ``Hub``. The ledger gives the
    data directory (the gossip key), the root key and the head to publish, the deltas to
    answer with, and the clock; ``site_key`` a site's enrolled public key (None: unknown)."""

    def __init__(
        self,
        ledger: Ledger,
        site_key: Callable[[str], str | None],
        *,
        host: str,
        port: int,
        advertise: Address | None,
        preset: str,
        cert_ttl_s: float,
    ) -> None:
        self.ledger = ledger
        self.site_key = site_key
        self.host, self.port = host, port
        self.advertise = advertise
        self.preset = preset
        self.cert_ttl_s = cert_ttl_s
        self.stats = HubGossipStats()
        self.service: GossipService | None = None
        self._sealer: DatagramSealer | None = None
        self._key: SigningKey | None = None
        self._anchor_of: str = ""
        self._anchors: frozenset[str] = frozenset()
        self._summaries: dict[str, tuple[dict[str, Any], float]] = {}
        self._answers = RateLimit(ANSWER_INTERVAL_S)
        # Called with a site's id when a newer summary of it is kept (the alerts).
        self.listeners: list[Callable[[str], None]] = []

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._key = key = await asyncio.to_thread(
            load_or_create_gossip_key, self.ledger.data_dir, self.ledger.kek
        )
        sealer = DatagramSealer(HUB_ID, self._key, self._own_cert())
        opener = SiteKeyOpener(self._trusted, self.site_key, recipient=HUB_ID)
        meta = None if self.advertise is None else address_meta(self.advertise)
        service = GossipService(
            gossip_config(self.preset),
            sealer,
            opener,
            host=self.host,
            port=self.port,
            meta=meta,
            relay=True,
            summary_verifier=self.summary_verifier(),
            summary_signer=summary_signer(lambda: key, HUB_ID),
            on_events=self._on_events,
            on_app_message=self._on_app_message,
            max_app_bytes=MAX_APP_BYTES,
        )
        await service.start()
        self.service, self._sealer = service, sealer
        self.publish_head()
        logger.info("gossip member %s on udp %s", HUB_ID, self.address)

    async def stop(self) -> None:
        service, self.service = self.service, None
        if service is not None:
            await service.stop()

    @property
    def address(self) -> str:
        """What sites are told: the advertised address, else the bound one."""
        if self.advertise is not None:
            return format_address(self.advertise)
        if self.service is None:
            return ""
        return format_address(self.service.address)

    def _trusted(self) -> frozenset[str]:
        root = self.ledger.root_key
        if root != self._anchor_of:
            self._anchor_of, self._anchors = root, frozenset({root})
        return self._anchors

    def _own_cert(self) -> bytes:
        assert self._key is not None
        expires = self.ledger.now() + self.cert_ttl_s
        return issue_cert(self.ledger.signing_keys[0], HUB_ID, bytes(self._key.verify_key), expires)

    def maintain(self) -> None:
        """Renew the hub's certificate when half its lifetime is gone or the root rotated
        (called by the hub's driver every tick; cheap otherwise)."""
        sealer = self._sealer
        if sealer is None or self.service is None:
            return
        cert = sealer.cert
        rotated = cert.anchor_key.hex() != self.ledger.root_key
        if rotated or cert.expires_at - self.ledger.now() < self.cert_ttl_s / 2:
            sealer.replace_cert(self._own_cert())
            logger.info("gossip: renewed the hub's certificate%s", " (root rotated)" * rotated)

    # -- what the HTTP API and the fleet view use ------------------------------------------

    def certificate_for(self, site_id: str, public_key: str) -> dict[str, Any]:
        """The answer of ``GET /v1/link/gossip`` for an authenticated site."""
        expires = self.ledger.now() + self.cert_ttl_s
        cert = issue_cert(self.ledger.signing_keys[0], site_id, public_key, expires)
        self.stats.certificates += 1
        peers = []
        service = self.service
        if service is not None:
            for mid, view in service.node.members().items():
                if mid in (HUB_ID, site_id) or view.state > MemberState.SUSPECT:
                    continue
                addr = service.learned_address(mid)
                if addr is not None:
                    peers.append({"id": mid, "addr": format_address(addr)})
                if len(peers) >= MAX_PEERS:
                    break
        return {
            "cert": base64.b64encode(cert).decode(),
            "expires_at": expires,
            "hub": {"id": HUB_ID, "addr": self.address},
            "preset": self.preset,
            "peers": peers,
        }

    def summary_of(self, site_id: str) -> tuple[dict[str, Any], float] | None:
        """The site's last gossip summary and when the hub received it."""
        return self._summaries.get(site_id)

    def forget(self, site_id: str) -> None:
        self._summaries.pop(site_id, None)

    def member_state(self, site_id: str) -> str | None:
        service = self.service
        view = None if service is None else service.node.member(site_id)
        return None if view is None else view.state.name.lower()

    def publish_head(self) -> None:
        service, key = self.service, self._key
        if service is None or key is None or not service.running:
            return
        head = self.ledger.head
        summary = hub_summary(head.version, head.hash, self.ledger.now())
        service.publish(orjson.dumps(summary))  # signed with its version by summary_signer

    def status_json(self) -> dict[str, Any]:
        service = self.service
        members = {}
        if service is not None:
            for mid, view in service.node.members().items():
                if mid != HUB_ID:
                    members[mid] = view.state.name.lower()
        return {
            "address": self.address,
            "preset": self.preset,
            "members": members,
            "stats": self.stats.as_dict(),
            "service": {} if service is None else service.stats.as_dict(),
        }

    def summary_verifier(self) -> SummaryVerifier:
        """The gossip core's check of summaries: a site's signed with its registered key,
        the hub's own with the hub's gossip key; anything else is refused (and counted)."""

        def key_of(member: str) -> bytes | None:
            if member == HUB_ID:
                return None if self._key is None else bytes(self._key.verify_key)
            public_key = self.site_key(member)
            if public_key is None:
                return None
            try:
                return bytes.fromhex(public_key)
            except ValueError:
                return None

        return summary_verifier(key_of, on_refused=self._refused)

    def _refused(self, summary: Summary, sender: str, why: str) -> None:
        self.stats.bad_summaries += 1
        logger.debug(
            "gossip: summary of %s from %s refused: %s", summary.member[:64], sender[:64], why
        )

    # -- callbacks ---------------------------------------------------------------------------

    def _on_events(self, events: list[Event]) -> None:
        for event in events:
            if event.kind != EventKind.SUMMARY or event.member_id == HUB_ID:
                continue
            try:
                self._keep_summary(event.member_id, event.value or b"", event.version)
            except BadSummary as exc:
                self.stats.bad_summaries += 1
                logger.debug("gossip: summary of %s ignored: %s", event.member_id[:64], exc)

    def _keep_summary(self, site_id: str, value: bytes, version: int) -> None:
        public_key = self.site_key(site_id)
        if public_key is None:
            raise BadSummary("not an enrolled site")
        opened = open_summary(value, site_id, bytes.fromhex(public_key), version)
        summary = parse_site_summary(opened)
        now = self.ledger.now()
        if summary["t"] > now + FUTURE_SKEW_S:
            raise BadSummary(f"stamped {summary['t'] - now:.0f} s in the future")
        previous = self._summaries.get(site_id)
        if previous is not None and summary["t"] <= previous[0]["t"]:
            self.stats.old_summaries += 1
            return
        self._summaries[site_id] = (summary, now)
        self.stats.summaries += 1
        for listener in self.listeners:
            listener(site_id)

    def _on_app_message(self, sender: str, body: bytes) -> None:
        try:
            if not body or body[0] != MSG_REQUEST:
                raise BadSummary("the hub only answers delta requests")
            after = parse_request(body[1:])
        except BadSummary as exc:
            self.stats.bad_messages += 1
            logger.debug("gossip: app message from %s ignored: %s", sender[:64], exc)
            return
        self._answer(sender, after)

    def _answer(self, sender: str, after: int) -> None:
        service, ledger = self.service, self.ledger
        if service is None or not ledger.is_open or after >= ledger.head.version:
            return
        if not self._answers.allow(sender, ledger.now()):
            return
        # The sender's view: no operations of the deltas that do not target it.
        envelopes = ledger.views_after(after, MAX_ANSWER_DELTAS, sender)
        messages = delta_messages(envelopes)
        for message in messages:
            service.send_app(sender, message)
        self.stats.requests_answered += 1
        self.stats.deltas_sent += len(messages)
