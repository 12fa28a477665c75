"""The site's end of the fleet link, run by the agent (docs/fleet-link.md).

Only the site's Raft leader talks to the hub, and only once a link configuration is in
the replicated state. It then keeps one long-poll open (``GET /v1/link/deltas``),
verifies what comes back against the trust state in Raft (``meshorch.fleet.delta``), commits
the deltas (``meshorch.fleet.apply``) and reports the site every few seconds and right
after applying. When the hub is unreachable it retries with capped, jittered backoff; the
site keeps running what it applied last. A report's answer carries the hub's head: when it
is past the applied version while a long-poll is still open, that poll's answer was lost
(a connection that died silently, e.g. through a cut uplink and its NAT), so the poll is
abandoned and sent again rather than left hanging until its timeout. Losing leadership
or stopping the agent ends the session and its tasks.

Deltas relayed to the agent API (``POST /v1/fleet/deltas``) go through ``commit`` too, on
any host: the trust record's compare-and-set keeps two committers from applying twice.

The leader's session also runs the site's gossip member (``meshorch.fleet.gossip``): it
publishes the site's summary to the other sites and the hub, and fetches deltas from them
when they announce newer ones (through ``commit`` as well). The last ``RECENT_ENVELOPES``
applied envelopes are kept in memory to answer such requests from other sites.

Its size: one long-lived session with the hub (enrol, poll, report, commit, watch
leadership) whose steps share the same connection and backoff state; the pure parts are
in ``meshorch.fleet.apply`` and ``meshorch.fleet.records``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from nacl.signing import SigningKey

from meshorch.apps.records import (
    APP_PREFIX,
    HOSTINFO_PREFIX,
    HOSTRES_PREFIX,
    INST_PREFIX,
    ROLLOUT_PREFIX,
    STATUS_PREFIX,
    InstanceReport,
    decode_hostinfo,
    decode_placement,
    decode_rollout,
    decode_spec,
)
from meshorch.apps.spec import SpecError
from meshorch.errors import RemoteInputError
from meshorch.fleet import decommission
from meshorch.fleet.apply import (
    LINK_KEY,
    REJECTIONS_KEY,
    SITE_KEY_KEY,
    TRUST_KEY,
    CommitOutcome,
    LinkConfig,
    SiteFacts,
    SiteKey,
    as_applied,
    build_report,
    encode_rejections,
    merge_link_config,
    plan_apply,
    plan_snapshot,
    rejection_entry,
)
from meshorch.fleet.client import (
    DEFAULT_WAIT_S,
    GossipInfo,
    HubTrust,
    HubUnreachable,
    LinkClient,
    LinkError,
    LinkRefused,
    RemoteLinkError,
)
from meshorch.fleet.delta import (
    DELTA_V2,
    Delta,
    DeltaRejected,
    TrustState,
    verify_batch,
    view_for,
)
from meshorch.fleet.escrow import SiteEscrow
from meshorch.fleet.forward import StreamForwarder
from meshorch.fleet.keyrotation import SiteKeyRotation
from meshorch.fleet.records import LinkRecords
from meshorch.fleet.snapshot import SnapshotRejected, verify_snapshot
from meshorch.secrets.service import SiteSecrets
from meshorch.state.ports import Members, SiteState
from meshorch.state.tables import APPS_TABLE, SYSTEM_TABLE
from meshorch.streams.site import SiteStreams
from raft import Put
from raft.errors import ProposalError

if TYPE_CHECKING:
    from meshorch.fleet.gossip import SiteGossip

logger = logging.getLogger(__name__)

IDLE_S = 0.5  # how often a follower (or an unconfigured leader) looks again
WATCH_S = 0.25  # how soon a leader notices it is no longer one
REPORT_INTERVAL_S = 3.0
# A report is small: one that takes longer has met a dead connection (a cut uplink);
# the next one is tried soon, as its answer (the hub's head) is what unblocks a lost poll.
REPORT_TIMEOUT_S = 4.0
REPORT_RETRY_S = 1.0  # the first retry of a report the hub did not take; then backing
REPORT_RETRY_MAX_S = 5.0  # off, jittered: a fleet's sites do not retry in step
BACKOFF_MIN_S = 0.25
BACKOFF_MAX_S = 5.0  # a healed link is used again within this (plus a fetch)
REJECTED_RETRY_S = 5.0  # after the hub served only deltas this site refuses
# A long-poll open this long while the hub's head is past the applied version has lost
# its answer: the hub answers a site that is behind at once.
STALE_POLL_S = 1.0
THREAD_VERIFY_AT = 8  # batches of more deltas are verified in a worker thread
# One commit's envelopes: its Raft proposal carries them (the applied record) and their
# operations (app specs), and must stay under the entry limit (8 MiB): a page the hub
# answers (up to 8 MiB) is committed a prefix at a time.
MAX_COMMIT_BYTES = 2 * 1024 * 1024
RECENT_ENVELOPES = 64  # applied envelopes kept to answer other sites' gossip requests
HUB_FIRST_S = 10.0  # gossip relays wait this long in a session for the hub's first answer


class NotConfigured(RemoteInputError):
    def __init__(self) -> None:
        super().__init__("not_configured", "this site has no fleet link configured")


class Held(RemoteInputError):
    def __init__(self) -> None:
        super().__init__(
            "held",
            "the hub holds this site: it applies no delta until the hub releases it "
            "(meshorch site release)",
        )


class HubFirst(RemoteInputError):
    def __init__(self) -> None:
        super().__init__(
            "hub_first",
            "waiting for the hub's first answer of this session (it may hold the site)",
        )


def commit_prefix(raws: Sequence[bytes], budget: int = MAX_COMMIT_BYTES) -> Sequence[bytes]:
    """The envelopes one commit takes: the longest prefix within ``budget`` bytes (at
    least one). The rest is fetched again after it (the poll asks from the new version)."""
    total = 0
    for count, raw in enumerate(raws):
        total += len(raw)
        if total > budget and count:
            return raws[:count]
    return raws


def relay_refusal(held: bool, hub_heard: bool, session_age_s: float) -> RemoteInputError | None:
    """Why deltas relayed by gossip are not committed now (None: they may be). Held: the
    hub said so. Early in a session: the hub has not answered yet and may be about to say
    it holds the site (a shop back online hears its peers as soon as the hub); after
    ``HUB_FIRST_S`` without an answer the hub is taken as unreachable, and relays count."""
    if held:
        return Held()
    if not hub_heard and session_age_s < HUB_FIRST_S:
        return HubFirst()
    return None


class ConfigConflict(RemoteInputError):
    def __init__(self) -> None:
        super().__init__("conflict", "the fleet configuration changed meanwhile; retry")


class Backoff:
    """Capped exponential backoff with jitter (``rng`` injected for tests)."""

    def __init__(
        self,
        min_s: float = BACKOFF_MIN_S,
        max_s: float = BACKOFF_MAX_S,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.min_s, self.max_s, self.rng = min_s, max_s, rng
        self.failures = 0

    def next_s(self) -> float:
        base = min(self.max_s, self.min_s * 2.0**self.failures)
        self.failures = min(self.failures + 1, 30)
        return base * (0.5 + 0.5 * self.rng())

    def reset(self) -> None:
        self.failures = 0


class SiteLink(LinkRecords):
    """The fleet link service of one agent; ``run`` is spawned by the agent."""

    def __init__(
        self,
        site: SiteState,
        members: Members,
        *,
        site_id: str,
        flag_config: LinkConfig | None,
        secrets: SiteSecrets,
        streams: SiteStreams,
        gossip_address: tuple[str, int],
        upgrade_state: Callable[[], dict[str, Any] | None] = lambda: None,
        clock: Callable[[], float] = time.time,
        wait_s: float = DEFAULT_WAIT_S,
    ) -> None:
        super().__init__(site)
        self.members = members
        self.site_id = site_id
        self.flag_config = flag_config  # from the agent's flags, stored once on a leader
        self.secrets = secrets
        self.streams = streams
        self.gossip_address = gossip_address  # the gossip member binds where the API does
        self.upgrade_state = upgrade_state  # the agent upgrade in progress, for the report
        self.clock = clock
        self.wait_s = wait_s
        self.connected = False
        self.last_contact: float | None = None
        self.hub_head: int | None = None
        self.site_head: int | None = None  # the hub's newest version for this site
        self.last_error: str | None = None
        self.held = False  # the hub said it holds this site: no delta is committed
        self._hub_heard = False  # an answer to a poll or report in this session
        self._session_started = time.monotonic()
        self._lock = asyncio.Lock()
        self._report_now = asyncio.Event()
        self._enrolled = asyncio.Event()  # reports wait: the hub refuses an unknown site
        self._poll_stale = asyncio.Event()
        self._poll_since: float | None = None  # monotonic start of the open long-poll
        self._flags_done = False
        self._enroll_refused: str | None = None  # the token the hub refused
        self.gossip: SiteGossip | None = None  # the gossip member of the current session
        self.forwarder: StreamForwarder | None = None  # the stream forwarding of the session
        self.gossip_info: GossipInfo | None = None  # the last one the hub gave
        # version -> the envelope as applied here (this site's view) and its delta
        self._recent: OrderedDict[int, tuple[bytes, Delta]] = OrderedDict()
        self.key_rotation = SiteKeyRotation(site, site_id, clock)

    # -- reading the replicated state ------------------------------------------------

    def recent_envelopes(self, after: int, requester: str) -> list[bytes]:
        """The consecutive applied envelopes after version ``after`` kept in memory, as
        ``requester`` may see them (``delta.view_for``: no operations of a delta that does
        not target it); they stop before the first one kept here without the operations
        that ``requester`` needs (a header of a delta for it, not for this site), and are
        empty when the one right after ``after`` is not kept."""
        out: list[bytes] = []
        version = after + 1
        while version in self._recent:
            raw, delta = self._recent[version]
            if not delta.target.decides(requester):
                break  # a Merkle target: this site holds its own proof, not the requester's
            if delta.format == DELTA_V2 and delta.target.includes(requester):
                if not delta.has_ops:
                    break  # its operations were never here: the requester asks the hub
                out.append(raw)
            elif delta.format == DELTA_V2 and delta.has_ops:
                out.append(view_for(raw, requester))
            else:
                out.append(raw)
            version += 1
        return out

    async def wait_enrolled(self) -> None:
        await self._enrolled.wait()

    def nudge(self, version: int) -> None:
        """A gossip member announced ``version``: an open long-poll that should have been
        answered by now is abandoned and sent again. Not with a hub serving per-site views
        (``site_head`` known): a newer fleet version may concern other sites only, which
        the poll is not answered for; the reports' ``site_head`` finds a lost answer."""
        if self.site_head is None:
            self._check_poll(version)

    @property
    def filtered(self) -> bool:
        """Whether the hub serves per-site views (its poll waits for this site's deltas)."""
        return self.site_head is not None

    def _is_leader(self) -> bool:
        return self.site.status().is_leader

    # -- configuration -----------------------------------------------------------------

    async def configure(self, wanted: LinkConfig) -> LinkConfig:
        """Store the link configuration; the trust state starts from its root key.

        Raises RemoteInputError (fleet_conflict, root_key_conflict, conflict).
        """
        raft = self.site
        await raft.barrier()
        link_record = raft.view.get(SYSTEM_TABLE, LINK_KEY)
        trust_record = raft.view.get(SYSTEM_TABLE, TRUST_KEY)
        current = None if link_record is None else LinkConfig.decode(link_record.value)
        trust = (
            None if trust_record is None else TrustState.from_json(orjson.loads(trust_record.value))
        )
        merged = merge_link_config(wanted, current, trust)
        link_index = 0 if link_record is None else link_record.mod_index
        ops = [Put(SYSTEM_TABLE, LINK_KEY, merged.encode(), link_index)]
        if trust_record is None:
            initial = orjson.dumps(merged.initial_trust().to_json())
            ops.append(Put(SYSTEM_TABLE, TRUST_KEY, initial, 0))
        results = await raft.propose(ops)
        if any(r.error == "conflict" for r in results):
            raise ConfigConflict()
        if current != merged:
            logger.info("fleet link: hub %s, fleet %s", merged.hub, merged.fleet)
        return merged

    async def _ensure_site_key(self) -> None:
        if self._get(SITE_KEY_KEY) is not None:
            return
        key = SiteKey(os.urandom(32))
        (result,) = await self.site.propose(
            [Put(SYSTEM_TABLE, SITE_KEY_KEY, key.encode(), expect_index=0)]
        )
        if result.ok:
            logger.info("created the site's fleet key %s", key_hex(SigningKey(key.seed)))

    async def _ensure_flag_config(self) -> None:
        wanted = self.flag_config
        if wanted is None or self._flags_done:
            return
        await self.site.barrier()
        current = self.link_config()
        if current is None:
            await self.configure(wanted)
        elif current.fleet != wanted.fleet:
            logger.error(
                "--fleet %s ignored: this site is already in fleet %s (change it with "
                "PUT /v1/fleet/link only after leaving that fleet)",
                wanted.fleet,
                current.fleet,
            )
        elif (current.hub, current.root_key, current.trust_tls) != (
            wanted.hub,
            wanted.root_key,
            wanted.trust_tls,
        ):
            logger.warning(
                "--hub/--fleet-key differ from the link configuration in the site state "
                "(hub %s); the site state wins, change it with PUT /v1/fleet/link",
                current.hub,
            )
        self._flags_done = True

    # -- the service -------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                if self._is_leader():
                    await self._ensure_site_key()
                    await self._ensure_flag_config()
                    config = self.link_config()
                    if config is not None and self.site_key() is not None:
                        await self._lead(config)
                        continue
            except (ProposalError, RemoteInputError) as exc:
                logger.warning("fleet link: %s", exc)
            except Exception:
                logger.exception("fleet link failed")
            self.connected = False
            await asyncio.sleep(IDLE_S)

    async def _lead(self, config: LinkConfig) -> None:
        """Talk to the hub until this host is no longer the leader or the hub changes."""
        key = self.site_key()
        assert key is not None
        logger.info("fleet link: connecting to %s for site %s", config.hub, self.site_id)
        self._hub_heard, self._session_started = False, time.monotonic()
        async with LinkClient(config.hub, self.site_id, key, trust=config.trust_tls) as client:
            self._report_now.set()
            # The gossip member and its stack are loaded only on a leader linked to a hub.
            from meshorch.fleet.gossip import SiteGossip

            self.gossip = SiteGossip(self, client, self.clock)
            escrow = SiteEscrow(self, self.secrets, client)
            tasks = [
                asyncio.create_task(self._fetch_loop(client, config), name="fleet-fetch"),
                asyncio.create_task(self._report_loop(client), name="fleet-report"),
                asyncio.create_task(self._watch(config), name="fleet-watch"),
                asyncio.create_task(self.gossip.run(), name="fleet-gossip"),
                asyncio.create_task(escrow.run(), name="fleet-escrow"),
                asyncio.create_task(self._forward_streams(client), name="fleet-streams"),
                asyncio.create_task(self._rotate_key(client), name="fleet-key"),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.connected = False
                self.gossip = None
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        logger.info("fleet link: session with %s ended", config.hub)

    async def _forward_streams(self, client: LinkClient) -> None:
        self.forwarder = StreamForwarder(self.streams, client)
        try:
            await self.forwarder.run()
        finally:
            self.forwarder = None

    async def _rotate_key(self, client: LinkClient) -> None:
        """Returns when the site key changed: every task of the session signs with it."""
        await self._enrolled.wait()
        await self.key_rotation.run(client, Backoff())
        logger.info("fleet link: the site key changed; starting a new session")

    async def _watch(self, config: LinkConfig) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            if not self._is_leader():
                logger.info("fleet link: no longer the leader")
                return
            current = self.link_config()
            if current is None or _endpoint(current) != _endpoint(config):
                self.gossip_info = None  # another hub: its certificate and peers
                return

    async def _enroll(self, client: LinkClient, config: LinkConfig) -> None:
        token = config.enroll_token
        if token is None or config.enrolled or self._enroll_refused == token:
            return
        backoff = Backoff()
        while True:
            try:
                await client.enroll(token)
            except HubUnreachable as exc:
                self._lost(exc)
                await asyncio.sleep(backoff.next_s())
                continue
            except LinkRefused as exc:
                # Perhaps enrolled already (by a leader that died before recording it).
                logger.error("fleet link: enrollment refused: %s", exc)
                self._enroll_refused = token
                return
            except RemoteLinkError as exc:
                logger.warning("fleet link: enrollment: %s", exc)
                await asyncio.sleep(backoff.next_s())
                continue
            break
        self._contact()
        logger.info("fleet link: enrolled at %s", config.hub)
        record = self.site.view.get(SYSTEM_TABLE, LINK_KEY)
        if record is not None:
            stored = LinkConfig.decode(record.value)
            if stored.enroll_token == token:
                done = dataclasses.replace(stored, enrolled=True)
                await self.site.propose(
                    [Put(SYSTEM_TABLE, LINK_KEY, done.encode(), record.mod_index)]
                )

    async def _fetch_loop(self, client: LinkClient, config: LinkConfig) -> None:
        await self._enroll(client, config)
        self._enrolled.set()
        backoff = Backoff()
        while True:
            trust = self.trust_state()
            if trust is None:
                await asyncio.sleep(IDLE_S)
                continue
            try:
                fetched = await self._poll(client, trust.version)
                if fetched is None:
                    logger.info("fleet link: the hub is past version %d; poll again", trust.version)
                    continue
                head, raws = fetched
            except LinkRefused as exc:
                if exc.code != "compacted":
                    self.last_error = str(exc)
                    logger.warning("fleet link: fetch: %s", exc)
                    await asyncio.sleep(backoff.next_s())
                    continue
                logger.info("fleet link: the hub compacted past version %d", trust.version)
                await self._catch_up(client, trust, backoff)
                continue
            except HubUnreachable as exc:
                self._lost(exc)
                await asyncio.sleep(backoff.next_s())
                continue
            except RemoteLinkError as exc:
                self.last_error = str(exc)
                logger.warning("fleet link: fetch: %s", exc)
                await asyncio.sleep(backoff.next_s())
                continue
            backoff.reset()
            self._contact()
            self._set_held(client.held)
            self.hub_head = head
            if not raws:
                continue
            try:
                outcome = await self.commit(raws, record_stuck=False)
            except Held:  # held since this poll was answered (a report said so)
                continue
            except ProposalError as exc:
                logger.warning("fleet link: not committed: %s", exc)
                await asyncio.sleep(backoff.next_s())
                continue
            if outcome.applied:
                self._report_now.set()
            elif outcome.rejected is not None and outcome.rejected.reason == "gap":
                await asyncio.sleep(BACKOFF_MIN_S)  # fetch again from the applied version
            elif outcome.rejected is not None and outcome.rejected.reason == "expired":
                # The page expired and nothing fresh follows it in the page: the chain
                # cannot vouch for it, a snapshot can.
                await self._catch_up(client, trust, backoff, outcome.rejected)
            elif outcome.rejected is not None:
                await asyncio.sleep(REJECTED_RETRY_S)

    async def _catch_up(
        self,
        client: LinkClient,
        trust: TrustState,
        backoff: Backoff,
        stuck: DeltaRejected | None = None,
    ) -> None:
        """Too far behind to follow the log: fetch this site's signed snapshot and commit
        it; the tail follows from its version. ``stuck`` is the delta refusal that led here
        (recorded when no snapshot can be had, e.g. from a hub without snapshots)."""
        if self.held:  # the hub holds this site: no snapshot either
            await asyncio.sleep(REJECTED_RETRY_S)
            return
        started = time.monotonic()
        try:
            raw, rotations = await client.snapshot(trust.version)
        except HubUnreachable as exc:
            self._lost(exc)
            await asyncio.sleep(backoff.next_s())
            return
        except RemoteLinkError as exc:
            self.last_error = f"no snapshot: {exc}"
            logger.warning("fleet link: version %d: no snapshot: %s", trust.version, exc)
            if stuck is not None:
                now = self.clock()
                await self._record(
                    [rejection_entry(stuck.reason, stuck.message, stuck.version, now)]
                )
            await asyncio.sleep(REJECTED_RETRY_S)
            return
        self._contact()
        try:
            outcome = await self.commit_snapshot(raw, rotations)
        except ProposalError as exc:
            logger.warning("fleet link: snapshot not committed: %s", exc)
            await asyncio.sleep(backoff.next_s())
            return
        if outcome.snapshot_rejected is not None:
            await asyncio.sleep(REJECTED_RETRY_S)
        elif outcome.applied:
            logger.info(
                "fleet link: caught up by snapshot from version %d to %d in %.2f s",
                trust.version,
                outcome.applied[0],
                time.monotonic() - started,
            )

    async def _trust_state(self) -> tuple[TrustState, int]:
        """The trust state every change so far left, and its record's index (a guard for
        the proposal that replaces it); under ``_lock``. NotConfigured when the site has
        none yet."""
        await self.site.barrier()
        record = self.site.view.get(SYSTEM_TABLE, TRUST_KEY)
        if record is None:
            raise NotConfigured()
        return TrustState.from_json(orjson.loads(record.value)), record.mod_index

    async def commit_snapshot(self, raw: bytes, rotations: Sequence[bytes]) -> CommitOutcome:
        """Verify a snapshot against the trust state in Raft and make it the site's
        desired state in one proposal (``plan_snapshot``). A refused one changes nothing
        but the rejections (reason ``snapshot_<reason>``). Raises NotConfigured,
        ProposalError, Held."""
        if self.held:
            raise Held()
        raft = self.site
        async with self._lock:
            state, trust_index = await self._trust_state()
            now = self.clock()
            outcome = CommitOutcome(state=state)
            try:
                snapshot, after = await asyncio.to_thread(
                    verify_snapshot, raw, rotations, state, self.site_id, now
                )
            except SnapshotRejected as exc:
                logger.warning("fleet link: %s", exc)
                outcome.snapshot_rejected = exc
                entry = rejection_entry(f"snapshot_{exc.reason}", exc.message, exc.version, now)
                await self._record([entry])
                return outcome
            plan = plan_snapshot(
                snapshot, after, trust_index, self.site_id, self._read, self._app_names()
            )
            results = await raft.propose(plan.ops)
            if not results[0].ok:
                outcome.conflict = True
                logger.warning("fleet link: the trust state moved meanwhile; snapshot not applied")
                return outcome
            outcome.applied, outcome.state = plan.applied, after
            self._recent.clear()  # the versions skipped are not kept
            outcome.op_errors = [e.rejection(now) for e in plan.op_errors]
            if outcome.op_errors:
                await self._record(outcome.op_errors)
            logger.info(
                "fleet link: applied the snapshot at version %d (%d operations)",
                snapshot.version,
                len(snapshot.ops),
            )
        self._report_now.set()
        return outcome

    async def _poll(self, client: LinkClient, after: int) -> tuple[int, list[bytes]] | None:
        """One long-poll for the deltas after ``after``; None when the report loop found
        the hub past ``after`` while the poll stayed open (its answer is lost)."""
        self._poll_stale.clear()
        self._poll_since = time.monotonic()
        fetch = asyncio.ensure_future(client.fetch(after, self.wait_s))
        stale = asyncio.ensure_future(self._poll_stale.wait())
        try:
            await asyncio.wait((fetch, stale), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._poll_since = None
            stale.cancel()
            if not fetch.done():
                fetch.cancel()
            await asyncio.gather(fetch, stale, return_exceptions=True)
        if fetch.cancelled():
            return None
        return fetch.result()

    def _check_poll(self, hub_head: int) -> None:
        """After a report: abandon an open long-poll that should have been answered."""
        since, trust = self._poll_since, self.trust_state()
        if since is None or trust is None or hub_head <= trust.version:
            return
        if time.monotonic() - since >= STALE_POLL_S:
            self._poll_stale.set()

    async def _report_loop(self, client: LinkClient) -> None:
        await self._enrolled.wait()
        interval_s = 0.0
        retry = Backoff(REPORT_RETRY_S, REPORT_RETRY_MAX_S)
        # The first report, one asked for (deltas applied) and a retry wait for the hub to
        # take them; the others, every REPORT_INTERVAL_S, are routine: sent quiet (the hub
        # answers only a change: a new head, a hold).
        wait_answer = True
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await self._report_now.wait()
                    wait_answer = True
            self._report_now.clear()
            interval_s = REPORT_INTERVAL_S
            report = self.report()
            if report is None:
                continue
            try:
                self.hub_head = await client.report(report, REPORT_TIMEOUT_S, quiet=not wait_answer)
            except HubUnreachable as exc:
                self._lost(exc)
                interval_s, wait_answer = retry.next_s(), True
                continue
            except RemoteLinkError as exc:
                logger.warning("fleet link: report: %s", exc)
                continue
            retry.reset()
            wait_answer = False
            self._contact()
            self._set_held(client.held)
            self.site_head = client.site_head
            # With per-site views the poll is answered at once only for this site's deltas.
            self._check_poll(self.hub_head if self.site_head is None else self.site_head)

    def _set_held(self, held: bool) -> None:
        self._hub_heard = True
        if held != self.held:
            logger.warning(
                "fleet link: %s",
                "the hub holds this site: no delta is applied until it is released"
                if held
                else "the hub released this site",
            )
        self.held = held

    def _contact(self) -> None:
        if not self.connected:
            logger.info("fleet link: connected to the hub")
        self.connected = True
        self.last_contact = self.clock()
        self.last_error = None

    def _lost(self, exc: LinkError) -> None:
        if self.connected:
            logger.warning("fleet link: hub unreachable: %s", exc)
        self.connected = False
        self.last_error = str(exc)

    # -- committing deltas ---------------------------------------------------------------

    async def commit_relayed(self, raws: Sequence[bytes]) -> CommitOutcome:
        """``commit`` for deltas a gossip peer relayed: refused while the hub holds the
        site, and early in a session until the hub answered (``relay_refusal``)."""
        age = time.monotonic() - self._session_started
        refusal = relay_refusal(self.held, self._hub_heard, age)
        if refusal is not None:
            raise refusal
        return await self.commit(raws, record_stuck=False)

    async def commit(self, raws: Sequence[bytes], record_stuck: bool = True) -> CommitOutcome:
        """Verify envelopes against the trust state in Raft and commit what passes.

        ``record_stuck`` False: an ``expired`` refusal with nothing accepted is not recorded
        (the fetch loop catches up by snapshot, and records it if that fails).

        Raises NotConfigured when the site has no trust state, Held while the hub holds
        the site (relayed deltas included), ProposalError when Raft did not commit.
        """
        if self.held:
            raise Held()
        raft = self.site
        raws = commit_prefix(raws)
        async with self._lock:
            state, trust_index = await self._trust_state()
            now = self.clock()
            site = self.site_id
            if len(raws) > THREAD_VERIFY_AT:
                result = await asyncio.to_thread(verify_batch, list(raws), state, now, site)
            else:
                result = verify_batch(raws, state, now, site)
            outcome = CommitOutcome(rejected=result.rejected, state=state)
            entries: list[dict[str, Any]] = []
            if result.rejected is not None:
                rejected = result.rejected
                # Not attacks: a relay that lacks the next deltas, or this site's operations.
                fetch_elsewhere = rejected.reason in ("gap", "ops_missing", "proof_missing")
                log = logger.info if fetch_elsewhere else logger.warning
                log("fleet link: delta %s refused: %s", rejected.version, rejected)
                stuck = rejected.reason == "expired" and not result.accepted
                if not fetch_elsewhere and (record_stuck or not stuck):
                    entries.append(
                        rejection_entry(rejected.reason, rejected.message, rejected.version, now)
                    )
            if result.accepted:
                assert result.state is not None
                applied = [
                    as_applied(raw, delta, site)
                    for raw, delta in zip(raws, result.accepted, strict=False)
                ]
                plan = plan_apply(
                    result.accepted,
                    result.state,
                    trust_index,
                    self.site_id,
                    self._read,
                    applied,
                    self._app_names(),
                )
                results = await raft.propose(plan.ops)
                if not results[0].ok:  # the guard: another leader applied first
                    outcome.conflict = True
                    logger.warning("fleet link: the trust state moved meanwhile; not applied")
                else:
                    outcome.applied = plan.applied
                    outcome.state = result.state
                    self._keep(applied, result.accepted)
                    outcome.op_errors = [e.rejection(now) for e in plan.op_errors]
                    entries.extend(outcome.op_errors)
                    for error in plan.op_errors:
                        logger.warning(
                            "fleet link: delta %d op %d skipped: %s",
                            error.version,
                            error.index,
                            error.message,
                        )
                    logger.info(
                        "fleet link: applied versions %d..%d (ops for this site in %s)",
                        plan.applied[0],
                        plan.applied[-1],
                        plan.for_site or "none",
                    )
            if entries:
                await self._record(entries)
        if outcome.applied:
            self._report_now.set()
        return outcome

    def _keep(self, applied: Sequence[bytes], deltas: Sequence[Delta]) -> None:
        for raw, delta in zip(applied, deltas, strict=True):
            self._recent[delta.version] = (raw, delta)
            self._recent.move_to_end(delta.version)
        while len(self._recent) > RECENT_ENVELOPES:
            self._recent.popitem(last=False)

    def _app_names(self) -> list[str]:
        """The applications this site has (their records), for the deletion interlock."""
        records, _ = self.site.view.scan(APPS_TABLE, APP_PREFIX, 1_000_000)
        return [key[len(APP_PREFIX) :].decode(errors="replace") for key, _ in records]

    def _read(self, table: str, key: bytes) -> bytes | None:
        record = self.site.view.get(table, key)
        return None if record is None else record.value

    async def _record(self, entries: list[dict[str, Any]]) -> None:
        kept = self.rejections()
        for entry in entries:
            last = kept[-1] if kept else None
            if last is not None and (last["reason"], last["version"], last["message"]) == (
                entry["reason"],
                entry["version"],
                entry["message"],
            ):
                continue  # the same refusal again (the hub keeps serving it)
            kept.append(entry)
        try:
            await self.site.propose(
                [Put(SYSTEM_TABLE, REJECTIONS_KEY, encode_rejections(kept))], idempotent=True
            )
        except ProposalError as exc:
            logger.warning("fleet link: rejections not recorded: %s", exc)

    # -- reporting ---------------------------------------------------------------------

    def _scan(self, prefix: bytes) -> list[bytes]:
        records, _ = self.site.view.scan(APPS_TABLE, prefix, 1_000_000)
        return [record.value for _, record in records]

    def facts(self) -> SiteFacts:
        specs = []
        for raw in self._scan(APP_PREFIX):
            with contextlib.suppress(SpecError):
                specs.append(decode_spec(raw))
        alive = self.members.reachable_hosts()
        hosts = [
            dataclasses.replace(host, alive=host.host_id in alive)
            for host in (decode_hostinfo(raw, alive=False) for raw in self._scan(HOSTINFO_PREFIX))
        ]
        return SiteFacts(
            secrets_public_key=self.secrets.public_key_hex(),
            specs=specs,
            placements=[decode_placement(raw) for raw in self._scan(INST_PREFIX)],
            reports={
                r.instance_id: r for r in map(InstanceReport.decode, self._scan(STATUS_PREFIX))
            },
            rollouts={r.app: r for r in map(decode_rollout, self._scan(ROLLOUT_PREFIX))},
            hosts=hosts,
            members=[m.host_id for m in self.members.members()],
            resources={
                key[len(HOSTRES_PREFIX) :].decode(): orjson.loads(record.value)
                for key, record in self.site.view.scan(APPS_TABLE, HOSTRES_PREFIX, 10_000)[0]
            },
        )

    def report(self) -> dict[str, Any] | None:
        trust = self.trust_state()
        if trust is None:
            return None
        report = build_report(self.site_id, self.clock(), trust, self.rejections(), self.facts())
        report["secrets_state"] = self.secrets_state()
        upgrade = self.upgrade_state()
        if upgrade is not None:
            report["agent_upgrade"] = upgrade
        ending = decommission.state(self.site.view)
        if ending is not None:
            report["decommission"] = {"state": ending["state"], "version": ending["version"]}
        return report

    def secrets_state(self) -> dict[str, Any]:
        """The site's secrets as the leader sees them, for the hub (never a value)."""
        secrets = self.secrets
        locked = secrets.locked_down()
        return {
            "initialized": secrets.public_key_hex() is not None,
            "sealed": secrets.sealed,
            "locked_down": locked,
            "secrets": [
                {k: item[k] for k in ("tenant", "name", "version", "state")}
                for item in secrets.list_json()
            ],
        }

    def status_json(self) -> dict[str, Any]:
        """What ``GET /v1/fleet`` shows (the token of the link configuration left out)."""
        key = self.site_key()
        config = self.link_config()
        trust = self.trust_state()
        return {
            "site": self.site_id,
            "site_key": None if key is None else key_hex(key),
            "site_key_rotation": self.key_rotation.status_json(),
            "link": None if config is None else config.to_json(),
            "trust": None if trust is None else trust.to_json(),
            "rejections": self.rejections(),
            "is_leader": self._is_leader(),
            "connected": self.connected,
            "last_contact": self.last_contact,
            "hub_head": self.hub_head,
            "held": self.held,
            "last_error": self.last_error,
            "gossip": None if self.gossip is None else self.gossip.status_json(),
            "streams": None if self.forwarder is None else self.forwarder.status_json(),
            "secrets_public_key": self.secrets.public_key_hex(),
        }


def key_hex(key: SigningKey) -> str:
    return bytes(key.verify_key).hex()


def _endpoint(config: LinkConfig) -> tuple[str, str, HubTrust]:
    """What a link session is bound to: another hub, fleet or TLS trust ends it."""
    return config.hub, config.fleet, config.trust_tls
