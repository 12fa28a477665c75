"""Gossip between the site leaders and the hub (docs/fleet-link.md, "Gossip").

The Raft leader of a site is a gossip member (``gossip.GossipService``) named by the site
id, behind NAT as far as the protocol knows, signing with the site's identity key under a
certificate the hub issues from the fleet root key (``GET /v1/link/gossip``); it accepts
datagrams from members whose certificate a key of the site's trust state signed. It:

- publishes a compact, signed summary of the site (``site_summary``) at most once a
  second when it changes, and every ``HEARTBEAT_S`` anyway, so the hub's fleet view stays
  fresh while the site's own link to the hub is down;
- punches the NATs of the peers the hub named (their public addresses) every ``PUNCH_S``,
  so the sites gossip with each other directly;
- listens to the others' summaries: one announcing a newer delta version than this site
  applied makes it wake its long-poll at the hub when the hub is reachable, and otherwise
  (or when that does not help within ``CATCH_UP_GRACE_S``) ask that member for the
  deltas after its version over app messages; the answers are verified and committed by
  ``SiteLink.commit_relayed`` exactly as relayed deltas are: the fleet root key's
  signature counts, not who passed them on (not while the hub holds the site, nor before
  the hub's first answer of a link session);
- answers such requests from the envelopes it applied last (kept in memory by the link).

Wire forms (pure helpers below):

    summary value   JSON object, then a 64-byte Ed25519 signature by the member's key over
                    SUMMARY_CONTEXT + member id + 0x00 + the gossip version (8 bytes, big
                    endian) + the JSON (the hub checks a site's with the site's registered
                    key, so no member can speak for another, nor replay a genuine summary at
                    a version of its choosing)
    app message     b"Q" + JSON {"after": N}: "send me your deltas after version N"
                    b"D" + one delta envelope, as served by the hub's link

Remote bad input (a summary or app message that does not parse) is counted in ``stats``
and ignored; datagram authentication is the adapter's.

Both ends hand their gossip core a summary verifier (``summary_verifier``), so a summary
whose origin signature does not check out is neither stored nor passed on, and cannot
displace the genuine one. A site checks a member's summary with the key of the member's
gossip certificate, known once the member's own datagrams reached it, and its own with
its key; one whose origin it has not heard from directly it takes only from the hub (the
hub passes on only summaries it checked against the sites' registered keys).

Its size: the site's gossip member (serving, summaries, relayed deltas, the verifier of
summaries) is one session object around ``gossip.GossipService``.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from gossip import (
    DatagramOpener,
    DatagramSealer,
    Event,
    EventKind,
    GossipConfig,
    GossipService,
    MemberState,
    SummarySigner,
    SummaryVerifier,
)
from gossip.errors import GossipError
from gossip.messages import Summary
from meshorch.errors import RemoteInputError
from meshorch.fleet.apply import CommitOutcome
from meshorch.fleet.client import (
    GOSSIP_PRESETS,
    Address,
    GossipInfo,
    LinkClient,
    LinkError,
    LinkRefused,
)
from meshorch.fleet.delta import DeltaRejected, TrustState, parse
from raft.errors import ProposalError

logger = logging.getLogger(__name__)

HUB_ID = "hub"
SUMMARY_CONTEXT = b"meshorch gossip summary v2\x00"
SIGNATURE_BYTES = 64
SUMMARY_VERSION = 1
MAX_SUMMARY_BYTES = 400  # signature included; GossipConfig allows 512
MAX_ALERTS_BYTES = 160
HEAD_PREFIX = 16
# App messages carry one delta envelope each (usually ~2 KB): a few IP fragments at most.
MAX_APP_BYTES = 8192
MSG_REQUEST = ord("Q")
MSG_DELTA = ord("D")
MAX_ANSWER_DELTAS = 16  # envelopes sent for one request
ANSWER_INTERVAL_S = 0.5  # per requester
MAX_PENDING = 64  # envelopes received ahead of the applied version, kept for the commit
MAX_HEARD = 4096

TICK_S = 0.5
PUBLISH_MIN_S = 1.0
HEARTBEAT_S = 10.0  # republished unchanged this often: the hub's fleet view stays fresh
PUNCH_S = 2.0
CATCH_UP_GRACE_S = 3.0  # behind this long with a reachable hub: ask the members too
REQUEST_INTERVAL_S = 1.0
INFO_REFRESH_S = 60.0
INFO_RETRY_S = 5.0  # members known whose public address the hub has not named yet
INFO_DISABLED_S = 60.0
CERT_RENEW_S = 86400.0  # a certificate closer than this to its expiry is renewed
RESTART_S = 5.0


class BadSummary(RemoteInputError):
    def __init__(self, message: str) -> None:
        super().__init__("bad_summary", message)


# -- summaries (pure) --------------------------------------------------------------------


def _signed_bytes(member_id: str, version: int, body: bytes) -> bytes:
    return SUMMARY_CONTEXT + member_id.encode() + b"\x00" + version.to_bytes(8, "big") + body


def sign_body(key: SigningKey, member_id: str, version: int, body: bytes) -> bytes:
    """The gossip value of a summary's JSON ``body`` at ``version``: it, then the signature."""
    return body + key.sign(_signed_bytes(member_id, version, body)).signature


def seal_summary(
    key: SigningKey, member_id: str, summary: Mapping[str, Any], version: int
) -> bytes:
    """The gossip value of ``summary`` at gossip version ``version``."""
    return sign_body(key, member_id, version, orjson.dumps(summary))


def summary_signer(key_of: Callable[[], SigningKey], member_id: str) -> SummarySigner:
    """The gossip core's signer of this member's summaries, with its current key."""
    return lambda version, body: sign_body(key_of(), member_id, version, body)


def summary_json(value: bytes) -> dict[str, Any]:
    """The JSON object of a summary value, unverified (BadSummary if it is not one)."""
    if len(value) <= SIGNATURE_BYTES or len(value) > MAX_SUMMARY_BYTES + 112:
        raise BadSummary(f"a summary of {len(value)} bytes")
    try:
        data = orjson.loads(value[:-SIGNATURE_BYTES])
    except orjson.JSONDecodeError:
        raise BadSummary("the summary is not JSON") from None
    if not isinstance(data, dict) or data.get("v") != SUMMARY_VERSION:
        raise BadSummary(f"the summary is not a version {SUMMARY_VERSION} object")
    return data


def open_summary(value: bytes, member_id: str, public_key: bytes, version: int) -> dict[str, Any]:
    """The JSON object of a summary signed by ``public_key`` for ``member_id`` at ``version``."""
    data = summary_json(value)
    body, signature = value[:-SIGNATURE_BYTES], value[-SIGNATURE_BYTES:]
    if not 0 <= version < 2**64:
        raise BadSummary(f"summary version {version} out of range")
    try:
        VerifyKey(public_key).verify(_signed_bytes(member_id, version, body), signature)
    except (BadSignatureError, ValueError):
        raise BadSummary(f"the summary of {member_id!r} is not signed by its key") from None
    return data


def summary_verifier(
    key_of: Callable[[str], bytes | None],
    trusted_relays: Collection[str] = (),
    on_refused: Callable[[Summary, str, str], None] | None = None,
) -> SummaryVerifier:
    """The gossip core's check of a summary (``gossip.core.SummaryVerifier``): signed by
    its member's key (``key_of(member)``, None when unknown), or, when that key is
    unknown, passed on by one of ``trusted_relays`` (members that check summaries
    themselves before passing them on). ``on_refused(summary, sender, why)`` is told of
    every refusal."""

    def verify(summary: Summary, sender: str) -> bool:
        member = summary.member
        key = key_of(member)
        if key is None:
            if sender in trusted_relays:
                return True
            why = f"no key known for {member[:64]!r}"
        else:
            try:
                open_summary(summary.value, member, key, summary.version)
                return True
            except BadSummary as exc:
                why = str(exc)
        if on_refused is not None:
            on_refused(summary, sender, why)
        return False

    return verify


def _uint(data: Mapping[str, Any], name: str) -> int:
    value = data.get(name)
    if type(value) is not int or not 0 <= value < 2**63:
        raise BadSummary(f"{name}: must be a non-negative integer")
    return value


def _time(data: Mapping[str, Any]) -> float:
    value = data.get("t")
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BadSummary("t: must be a number")
    if not math.isfinite(value):
        raise BadSummary("t: must be finite")
    return float(value)


def _short_text(data: Mapping[str, Any], name: str, limit: int = 64) -> str:
    value = data.get(name)
    if not isinstance(value, str) or len(value) > limit:
        raise BadSummary(f"{name}: must be a string of at most {limit} characters")
    return value


def apps_digest(apps: Mapping[str, Mapping[str, Any]]) -> str:
    """A short digest of every application's version, state and instance counts."""
    parts = sorted(
        (name, str(a.get("version")), str(a.get("state")), a.get("desired"), a.get("ready"))
        for name, a in apps.items()
    )
    return hashlib.sha256(orjson.dumps(parts)).hexdigest()[:HEAD_PREFIX]


def site_summary(report: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The compact summary of a site report (docs/fleet-link.md); its JSON stays within
    ``MAX_SUMMARY_BYTES`` minus the signature whatever the report holds."""
    apps: Mapping[str, Mapping[str, Any]] = report.get("apps", {})
    hosts = report.get("hosts", [])
    alerts: list[str] = []
    used = 0
    failed = sorted(name for name, a in apps.items() if a.get("state") == "failed")
    for name in failed:
        if used + len(name) + 3 > MAX_ALERTS_BYTES:
            break
        alerts.append(name)
        used += len(name) + 3
    summary: dict[str, Any] = {
        "v": SUMMARY_VERSION,
        "t": round(now, 3),
        "av": int(report.get("applied_version", 0)),
        "ah": str(report.get("applied_head", ""))[:HEAD_PREFIX],
        "apps": apps_digest(apps),
        "na": len(apps),
        "n": len(hosts),
        "up": sum(1 for h in hosts if h.get("alive")),
        "alerts": alerts,
    }
    if len(failed) > len(alerts):
        summary["more_alerts"] = len(failed) - len(alerts)
    return summary


def parse_site_summary(data: Mapping[str, Any]) -> dict[str, Any]:
    """The normalised site summary (known fields only), or BadSummary."""
    alerts = data.get("alerts", [])
    if (
        not isinstance(alerts, list)
        or len(alerts) > 32
        or not all(isinstance(a, str) and len(a) <= 63 for a in alerts)
    ):
        raise BadSummary("alerts: must be a list of application names")
    out = {
        "v": SUMMARY_VERSION,
        "t": _time(data),
        "av": _uint(data, "av"),
        "ah": _short_text(data, "ah"),
        "apps": _short_text(data, "apps"),
        "na": _uint(data, "na"),
        "n": _uint(data, "n"),
        "up": _uint(data, "up"),
        "alerts": list(alerts),
    }
    if "more_alerts" in data:
        out["more_alerts"] = _uint(data, "more_alerts")
    return out


def hub_summary(head: int, head_hash: str, now: float) -> dict[str, Any]:
    return {"v": SUMMARY_VERSION, "t": round(now, 3), "head": head, "hh": head_hash[:HEAD_PREFIX]}


def announced_version(member_id: str, value: bytes) -> int:
    """The delta version a member's summary announces: the hub's head, a site's applied
    version (unverified: only a hint, the deltas themselves are verified)."""
    data = summary_json(value)
    return _uint(data, "head" if member_id == HUB_ID else "av")


def request_message(after: int) -> bytes:
    return bytes((MSG_REQUEST,)) + orjson.dumps({"after": after})


def parse_request(body: bytes) -> int:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadSummary("a delta request that is not JSON") from None
    if not isinstance(data, dict):
        raise BadSummary("a delta request is an object")
    return _uint(data, "after")


def delta_messages(envelopes: Iterable[bytes], limit: int = MAX_APP_BYTES) -> list[bytes]:
    """App messages for the envelopes that fit one message each (bigger ones are left to
    the hub's link), at most ``MAX_ANSWER_DELTAS``; stops at the first that does not fit,
    so what is sent stays consecutive."""
    out: list[bytes] = []
    for envelope in envelopes:
        if len(envelope) + 1 > limit or len(out) >= MAX_ANSWER_DELTAS:
            break
        out.append(bytes((MSG_DELTA,)) + envelope)
    return out


def gossip_config(preset: str) -> GossipConfig:
    if preset not in GOSSIP_PRESETS:
        raise ValueError(f"gossip preset {preset!r} is not one of {GOSSIP_PRESETS}")
    config: GossipConfig = getattr(GossipConfig, preset)()
    return config


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return True


class RateLimit:
    """At most one event per ``interval_s`` per key; bounded (oldest keys forgotten)."""

    def __init__(self, interval_s: float, max_keys: int = 4096) -> None:
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._last: OrderedDict[str, float] = OrderedDict()

    def allow(self, key: str, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        if len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        return True


@dataclass(slots=True)
class GossipStats:
    """Counters of a site's gossip (monotonic)."""

    summaries_published: int = 0
    summaries_heard: int = 0
    bad_summaries: int = 0  # refused by the core's check (forged, unknown key), or not parsed
    bad_messages: int = 0
    requests_sent: int = 0
    requests_answered: int = 0
    deltas_sent: int = 0
    deltas_received: int = 0
    deltas_applied: int = 0
    deltas_refused: int = 0
    info_fetches: int = 0
    info_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# -- the site's member -------------------------------------------------------------------


class GossipLink(Protocol):
    """What the gossip member uses of the link (``meshorch.fleet.site_link.SiteLink``):
    what outlives a session, the site's identity, and the committing of deltas."""

    site_id: str
    gossip_address: tuple[str, int]  # host, port the member binds (the agent API's)
    gossip_info: GossipInfo | None
    connected: bool

    async def wait_enrolled(self) -> None: ...

    def site_key(self) -> SigningKey | None: ...

    def trusted_keys(self) -> frozenset[str]: ...

    def trust_state(self) -> TrustState | None: ...

    def report(self) -> dict[str, Any] | None: ...

    def nudge(self, version: int) -> None: ...

    @property
    def filtered(self) -> bool: ...

    async def commit_relayed(self, raws: Sequence[bytes]) -> CommitOutcome: ...

    def recent_envelopes(self, after: int, requester: str) -> list[bytes]: ...


class SiteGossip:
    """The gossip member of the site leader, for one link session (``run`` until cancelled).

    ``link`` keeps what must outlive a session: the last gossip info (so a leader that
    loses the hub keeps gossiping with the certificate it has) and the applied envelopes.
    """

    def __init__(
        self, link: GossipLink, client: LinkClient, clock: Callable[[], float] = time.time
    ) -> None:
        self.link = link
        self.client = client
        self.clock = clock
        self.site = link.site_id
        self.stats = GossipStats()
        self.service: GossipService | None = None
        self._sealer: DatagramSealer | None = None
        self._heard: OrderedDict[str, int] = OrderedDict()  # member -> announced version
        self._pending: dict[int, bytes] = {}
        self._commit_now = asyncio.Event()
        self._answers = RateLimit(ANSWER_INTERVAL_S)
        self._published: tuple[Any, ...] | None = None
        self._published_at = -math.inf
        self._asked_at = -math.inf
        self._ask_turn = 0
        self._behind_since: float | None = None
        self._nudged_at = -math.inf
        self._next_punch = -math.inf
        self._info_disabled_logged = False

    # -- life cycle ----------------------------------------------------------------------

    async def run(self) -> None:
        """Get the gossip info, then be a member until cancelled (never returns)."""
        await self.link.wait_enrolled()
        while True:
            info = self.link.gossip_info or await self._fetch_info_until_ok()
            try:
                await self._serve(info)
            except (OSError, GossipError, ValueError) as exc:
                logger.warning("gossip: %s; trying again in %.0f s", exc, RESTART_S)
            except Exception:
                logger.exception("gossip failed; trying again in %.0f s", RESTART_S)
            await asyncio.sleep(RESTART_S)

    async def _fetch_info(self) -> GossipInfo | None:
        try:
            info = await self.client.gossip_info()
        except LinkRefused as exc:
            self.stats.info_errors += 1
            if exc.status == 404:
                if not self._info_disabled_logged:
                    logger.info("gossip: the hub does not gossip (%s)", exc.code)
                    self._info_disabled_logged = True
            else:
                logger.warning("gossip: %s", exc)
            return None
        except LinkError as exc:
            self.stats.info_errors += 1
            logger.debug("gossip: no info from the hub: %s", exc)
            return None
        self.stats.info_fetches += 1
        self._info_disabled_logged = False
        self.link.gossip_info = info
        return info

    async def _fetch_info_until_ok(self) -> GossipInfo:
        while True:
            info = await self._fetch_info()
            if info is not None:
                return info
            await asyncio.sleep(INFO_DISABLED_S if self._info_disabled_logged else INFO_RETRY_S)

    async def _hub_address(self, info: GossipInfo) -> Address:
        host, port = info.hub_addr
        if not _unspecified(host):
            return host, port
        url_host = urlsplit(self.client.hub_url).hostname or "127.0.0.1"
        if not _unspecified(url_host):
            return url_host, port
        loop = asyncio.get_running_loop()
        found = await loop.getaddrinfo(url_host, port, type=socket.SOCK_DGRAM)
        return str(found[0][4][0]), port

    async def _serve(self, info: GossipInfo) -> None:
        key = self.link.site_key()
        if key is None:
            raise ValueError("the site has no identity key yet")
        host, port = self.link.gossip_address
        sealer = DatagramSealer(self.site, key, info.cert)
        opener = DatagramOpener(self.link.trusted_keys, recipient=self.site)
        service = GossipService(
            gossip_config(info.preset),
            sealer,
            opener,
            host=host,
            port=port,
            natted=True,
            summary_verifier=self.summary_verifier(opener, info.hub_id),
            # The current key: the site's key may be rotated while the service runs.
            summary_signer=summary_signer(lambda: self.link.site_key() or key, self.site),
            on_events=self._on_events,
            on_app_message=self._on_app_message,
            max_app_bytes=MAX_APP_BYTES,
        )
        hub_addr = await self._hub_address(info)
        async with service:
            self.service, self._sealer = service, sealer
            logger.info(
                "gossip: member %s on udp %s, hub at %s",
                self.site,
                service.address,
                hub_addr,
            )
            try:
                self._set_addresses(service, info, hub_addr)
                service.join([info.hub_id])
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._maintain(service))
                    group.create_task(self._refresh(service, sealer, hub_addr))
                    group.create_task(self._committer())
            finally:
                self.service = self._sealer = None

    def summary_verifier(self, opener: DatagramOpener, hub_id: str = HUB_ID) -> SummaryVerifier:
        """The core's check of summaries: the site's own with its key, another member's
        with the key of its certificate (``opener``: the member's datagrams reached us),
        else only when the hub passed it on."""

        def key_of(member: str) -> bytes | None:
            if member == self.site:
                key = self.link.site_key()
                return None if key is None else bytes(key.verify_key)
            return opener.member_key(member, self.clock())

        return summary_verifier(key_of, (hub_id,), self._refused)

    def _refused(self, summary: Summary, sender: str, why: str) -> None:
        self.stats.bad_summaries += 1
        logger.debug(
            "gossip: summary of %s from %s refused: %s", summary.member[:64], sender[:64], why
        )

    def _set_addresses(self, service: GossipService, info: GossipInfo, hub_addr: Address) -> None:
        book = {mid: addr for mid, addr in info.peers.items() if mid != self.site}
        book[info.hub_id] = hub_addr
        service.set_addresses(book, replace=True)

    # -- periodic work -------------------------------------------------------------------

    async def _maintain(self, service: GossipService) -> None:
        while True:
            try:
                now = self.clock()
                self._publish(service, now)
                if now >= self._next_punch:
                    self._next_punch = now + PUNCH_S
                    info = self.link.gossip_info
                    if info is not None:
                        service.punch(mid for mid in info.peers if mid != self.site)
                self._catch_up(now)
            except Exception:
                logger.exception("gossip: maintenance failed")
            await asyncio.sleep(TICK_S)

    def _publish(self, service: GossipService, now: float) -> None:
        if now - self._published_at < PUBLISH_MIN_S:
            return
        key = self.link.site_key()
        report = self.link.report()
        if key is None or report is None:
            return
        summary = site_summary(report, now)
        content = tuple((k, str(v)) for k, v in summary.items() if k != "t")
        if content == self._published and now - self._published_at < HEARTBEAT_S:
            return
        body = orjson.dumps(summary)
        if len(body) + SIGNATURE_BYTES > MAX_SUMMARY_BYTES:
            logger.warning("gossip: a summary of %d bytes is not published", len(body))
            return
        service.publish(body)  # signed with its version by summary_signer
        self._published, self._published_at = content, now
        self.stats.summaries_published += 1

    async def _refresh(
        self, service: GossipService, sealer: DatagramSealer, hub_addr: Address
    ) -> None:
        last = time.monotonic()
        while True:
            # The interval depends on what the member learns meanwhile: look again often.
            await asyncio.sleep(TICK_S)
            if time.monotonic() - last < self._refresh_interval(service):
                continue
            last = time.monotonic()
            info = await self._fetch_info()
            if info is None:
                continue  # keep the last one
            try:
                sealer.replace_cert(info.cert)
            except GossipError as exc:  # the site key changed: start again
                raise ValueError(f"the new certificate does not fit: {exc}") from None
            self._set_addresses(service, info, hub_addr)

    def _refresh_interval(self, service: GossipService) -> float:
        info, sealer = self.link.gossip_info, self._sealer
        if info is None or sealer is None:
            return INFO_RETRY_S
        if sealer.cert.expires_at - self.clock() < CERT_RENEW_S:
            return INFO_RETRY_S
        for mid, view in service.node.members().items():
            if (
                mid not in (self.site, info.hub_id)
                and view.state <= MemberState.SUSPECT
                and mid not in info.peers
            ):
                return INFO_RETRY_S  # a member whose public address the hub may know now
        return INFO_REFRESH_S

    # -- catching up -------------------------------------------------------------------------

    def _catch_up(self, now: float) -> None:
        service, trust = self.service, self.link.trust_state()
        if service is None or trust is None:
            return
        applied = trust.version
        ahead = [(v, mid) for mid, v in self._heard.items() if v > applied]
        if not ahead:
            self._behind_since = None
            return
        if self._behind_since is None:
            self._behind_since = now
        best = max(v for v, _ in ahead)
        if self.link.connected and self.link.filtered:
            # The hub serves per-site views: a newer version may concern other sites
            # only; the link brings their headers with this site's next answer.
            return
        if self.link.connected:
            if now - self._nudged_at >= CATCH_UP_GRACE_S:
                self._nudged_at = now  # a member announcing nonsense costs a poll per 3 s
                self.link.nudge(best)
            if now - self._behind_since < CATCH_UP_GRACE_S:
                return
        if now - self._asked_at < REQUEST_INTERVAL_S:
            return
        # Most advanced first; turn by turn, so one member that does not answer is no wall.
        ahead.sort(key=lambda item: (-item[0], item[1]))
        for i in range(len(ahead)):
            _, mid = ahead[(self._ask_turn + i) % len(ahead)]
            if service.send_app(mid, request_message(applied)):
                self._ask_turn += i + 1
                self._asked_at = now
                self.stats.requests_sent += 1
                logger.debug("gossip: asked %s for the deltas after %d", mid, applied)
                return

    async def _committer(self) -> None:
        while True:
            await self._commit_now.wait()
            self._commit_now.clear()
            trust = self.link.trust_state()
            if trust is None:
                continue
            for version in [v for v in self._pending if v <= trust.version]:
                del self._pending[version]
            batch: list[bytes] = []
            version = trust.version + 1
            while version in self._pending:
                batch.append(self._pending.pop(version))
                version += 1
            if not batch:
                continue
            try:
                # An expired batch with nothing fresh after it is the link's to catch up
                # (by snapshot, recording the refusal only if that fails), not a rejection.
                outcome = await self.link.commit_relayed(batch)
            except (ProposalError, RemoteInputError) as exc:
                logger.warning("gossip: relayed deltas not committed: %s", exc)
                await asyncio.sleep(REQUEST_INTERVAL_S)
                continue
            if outcome.applied:
                self.stats.deltas_applied += len(outcome.applied)
                logger.info(
                    "gossip: applied versions %d..%d from a gossip member",
                    outcome.applied[0],
                    outcome.applied[-1],
                )
            if outcome.rejected is not None:
                self.stats.deltas_refused += 1
            if self._pending:
                self._commit_now.set()

    # -- callbacks (inside the event loop's datagram handling: no blocking) -------------

    def _on_events(self, events: list[Event]) -> None:
        changed = False
        for event in events:
            if event.kind == EventKind.SUMMARY and event.value is not None:
                self.stats.summaries_heard += 1
                try:
                    version = announced_version(event.member_id, event.value)
                except BadSummary as exc:
                    self.stats.bad_summaries += 1
                    logger.debug("gossip: summary of %s ignored: %s", event.member_id, exc)
                    continue
                self._heard[event.member_id] = version
                self._heard.move_to_end(event.member_id)
                if len(self._heard) > MAX_HEARD:
                    self._heard.popitem(last=False)
                changed = True
            elif event.kind in (EventKind.DEAD, EventKind.LEFT):
                self._heard.pop(event.member_id, None)
        if changed:
            self._catch_up(self.clock())

    def _on_app_message(self, sender: str, body: bytes) -> None:
        kind, rest = (body[0], body[1:]) if body else (None, b"")
        try:
            if kind == MSG_REQUEST:
                self._answer(sender, parse_request(rest))
            elif kind == MSG_DELTA:
                self._received(rest)
            else:
                raise BadSummary(f"unknown app message type {kind!r}")
        except (BadSummary, DeltaRejected) as exc:
            self.stats.bad_messages += 1
            logger.debug("gossip: app message from %s ignored: %s", sender, exc)

    def _answer(self, sender: str, after: int) -> None:
        service = self.service
        if service is None or not self._answers.allow(sender, self.clock()):
            return
        messages = delta_messages(self.link.recent_envelopes(after, sender))
        for message in messages:
            service.send_app(sender, message)
        self.stats.requests_answered += 1
        self.stats.deltas_sent += len(messages)

    def _received(self, envelope: bytes) -> None:
        delta, _, _ = parse(envelope)  # framing only: commit verifies
        self.stats.deltas_received += 1
        trust = self.link.trust_state()
        applied = 0 if trust is None else trust.version
        if applied < delta.version <= applied + MAX_PENDING:
            self._pending[delta.version] = envelope
            self._commit_now.set()

    # -- status ------------------------------------------------------------------------------

    def status_json(self) -> dict[str, Any]:
        service = self.service
        out: dict[str, Any] = {"member": self.site, "running": service is not None}
        out["stats"] = self.stats.as_dict()
        if service is None:
            return out
        host, port = service.address
        out["address"] = f"{host}:{port}"
        members = {}
        for mid, view in service.node.members().items():
            if mid == self.site:
                continue
            learned = service.learned_address(mid)
            members[mid] = {
                "state": view.state.name.lower(),
                "natted": view.natted,
                "relay": view.relay,
                "address": None if learned is None else f"{learned[0]}:{learned[1]}",
                "announced": self._heard.get(mid),
            }
        out["members"] = members
        out["service"] = service.stats.as_dict()
        return out
