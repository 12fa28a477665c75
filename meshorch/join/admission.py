"""The site side of joining: issue tokens, admit hosts, revoke them.

Runs on any agent of a mesh site. Decisions use a linearizable view of the
replicated state, and every claim (a single-use token, an overlay address) is
a compare-and-set through Raft, so two agents admitting at once cannot hand
out the same token use or address.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson

from meshorch.join.protocol import (
    JoinAnswer,
    JoinRefused,
    JoinRequest,
    JoinToken,
    SiteIdentity,
    TokenRecord,
    check_join,
    revocation_notice,
    token_verifier,
    wrap_answer,
)
from meshorch.state.ports import Members, SiteState
from meshorch.state.tables import (
    IPAM_PREFIX,
    REVOKED_PREFIX,
    SITE_IDENTITY_KEY,
    SITE_NETWORK_KEY,
    SYSTEM_TABLE,
    MemberRecord,
)
from netmesh import AddressPlan, seal
from raft import Delete, Put
from raft.errors import NotCommittedError, ProposalError
from raft.node import MEMBERSHIP_RETRY_S

logger = logging.getLogger(__name__)

# Per removal attempt: pysyncobj's refusals last while a change or an election settles.
REMOVE_ATTEMPT_S = 2.0
STEP_DOWN = "/v1/raft/step-down"
STEP_DOWN_ASK_S = 3.0  # a leader asked to step down that still leads after this is asked again

MAX_TOKEN_TTL_S = 30 * 24 * 3600
ADD_MEMBER_ATTEMPTS = 20
TOKEN_SPEND_ATTEMPTS = 8


class SiteNotReady(JoinRefused):
    """The site cannot admit yet (no identity committed); retry later."""


@dataclass(frozen=True)
class SiteNetwork:
    network: str
    raft_port: int

    def encode(self) -> bytes:
        return orjson.dumps({"v": 1, "network": self.network, "raft_port": self.raft_port})

    @staticmethod
    def decode(raw: bytes) -> SiteNetwork:
        data = orjson.loads(raw)
        return SiteNetwork(str(data["network"]), int(data["raft_port"]))


class MembershipNode(SiteState, Protocol):
    """The Raft member admission works through: the state, and membership changes."""

    async def add_member(self, address: str) -> None: ...

    async def remove_member(self, address: str, retry_s: float = ...) -> None: ...


Spawn = Callable[[Coroutine[Any, Any, None], str], None]


class Admission:
    """Join tokens, admitting hosts and revoking them, for one agent of a mesh site."""

    def __init__(
        self,
        node: MembershipNode,
        members: Members,
        site: str,
        password: Callable[[], str | None],
        spawn: Spawn,
        sign: Callable[[str, str], Mapping[str, str]] | None = None,
    ) -> None:
        self.sign = sign  # proves this host to the leader it asks to step down
        self.node = node
        self.members = members
        self.site = site
        # The cluster password an admitted host receives; None while it is being changed.
        self.password = password
        self.spawn = spawn  # runs a background task the agent owns

    def site_identity(self) -> SiteIdentity:
        record = self.node.view.get(SYSTEM_TABLE, SITE_IDENTITY_KEY)
        if record is None:
            raise SiteNotReady("site_not_ready", "this site has no identity yet (not a mesh site?)")
        return SiteIdentity.decode(record.value)

    async def create_token(self, ttl_s: float, single_use: bool) -> dict[str, Any]:
        """Store a new token in the site state and return it, encoded, with its expiry."""
        if not 0 < ttl_s <= MAX_TOKEN_TTL_S:
            raise JoinRefused("bad_ttl", f"ttl must be between 1 s and {MAX_TOKEN_TTL_S} s")
        await self.node.barrier()
        identity = self.site_identity()
        secret = secrets.token_bytes(24)  # handed out once, in the token; never stored
        record = TokenRecord(
            token_id=secrets.token_hex(8),
            verifier=token_verifier(secret),
            expires_at=time.time() + ttl_s,
            single_use=single_use,
        )
        await self.node.propose([Put(SYSTEM_TABLE, record.key(), record.encode(), expect_index=0)])
        token = JoinToken(self.site, record.token_id, secret, identity.fingerprint)
        return {
            "token": token.encode(),
            "token_id": record.token_id,
            "expires_at": record.expires_at,
            "single_use": single_use,
            "site_fingerprint": identity.fingerprint,
        }

    def _revoked_keys(self) -> dict[str, str]:
        records, _ = self.node.view.scan(SYSTEM_TABLE, REVOKED_PREFIX, 100_000)
        revoked = {}
        for key, record in records:
            data = orjson.loads(record.value)
            revoked[key[len(REVOKED_PREFIX) :].decode()] = str(data.get("wg_public_key", ""))
        return revoked

    def _revoked_wg_keys(self, revoked: Mapping[str, str]) -> set[str]:
        return {key for key in revoked.values() if key}  # static-mode hosts have none

    async def admit(self, request: JoinRequest, now: float) -> dict[str, str]:
        """Admit ``request`` into the site; return the signed, sealed answer body."""
        raft = self.node
        view = raft.view
        await raft.barrier()
        identity = self.site_identity()
        network_record = view.get(SYSTEM_TABLE, SITE_NETWORK_KEY)
        if network_record is None:
            raise SiteNotReady("site_not_ready", "this site has no overlay network yet")
        network = SiteNetwork.decode(network_record.value)

        # The proof first: a requester without the token's secret learns nothing more.
        token_record = view.get(SYSTEM_TABLE, b"token/" + request.token_id.encode())
        stored = TokenRecord.decode(token_record.value) if token_record else None
        check_join(request, self.site, stored, now)
        revoked = self._revoked_keys()
        if request.host_id in revoked or request.wg_public_key in self._revoked_wg_keys(revoked):
            raise JoinRefused("revoked_host", f"host {request.host_id} (or its key) was revoked")
        members = {m.host_id: m for m in self.members.members()}
        existing = members.get(request.host_id)
        if existing is not None and existing.wg_public_key != request.wg_public_key:
            raise JoinRefused("host_id_taken", f"host id {request.host_id} is taken by another key")
        password = self.password()
        if password is None:
            raise SiteNotReady(
                "password_rotation", "the site is changing its cluster password: retry shortly"
            )
        await self._spend_token(request, now)

        overlay_ip = existing.overlay_ip if existing and existing.overlay_ip else None
        if overlay_ip is None:
            overlay_ip = await self._claim_address(AddressPlan.from_cidr(network.network), request)
        member = MemberRecord(
            host_id=request.host_id,
            raft=f"{overlay_ip}:{network.raft_port}",
            api=request.api,
            wg_public_key=request.wg_public_key,
            overlay_ip=overlay_ip,
            wg_endpoint=request.wg_endpoint,
        )
        await raft.propose([Put(SYSTEM_TABLE, member.key(), member.encode())], idempotent=True)
        raft_members = tuple(sorted({*raft.status().members, member.raft}))
        answer = JoinAnswer(
            site=self.site,
            host_id=request.host_id,
            overlay_ip=overlay_ip,
            overlay_network=network.network,
            raft_port=network.raft_port,
            raft_members=raft_members,
            peers=tuple(m.to_json() for m in self.members.members() if m.wg_public_key),
            cluster_password=password,
        )
        self.spawn(self._add_raft_member(member), f"add-member-{member.host_id}")
        logger.info("admitted %s at %s", member.host_id, overlay_ip)
        return wrap_answer(seal(answer.encode(), request.wg_public_key), identity)

    async def _spend_token(self, request: JoinRequest, now: float) -> None:
        """Record the token's use by compare-and-set: of two hosts racing for a single-use
        token one loses; hosts sharing a reusable token just retry."""
        token_key = b"token/" + request.token_id.encode()
        for _ in range(TOKEN_SPEND_ATTEMPTS):
            current = self.node.view.get(SYSTEM_TABLE, token_key)
            stored = TokenRecord.decode(current.value) if current else None
            spent = check_join(request, self.site, stored, now)
            assert current is not None and stored is not None  # check_join refuses unknown tokens
            (spend,) = await self.node.propose(
                [Put(SYSTEM_TABLE, token_key, spent.encode(), expect_index=current.mod_index)]
            )
            if spend.ok:
                return
            if stored.single_use:
                raise JoinRefused("used_token", "the single-use join token was used concurrently")
        raise JoinRefused("busy", "too many hosts are joining with this token at once; retry")

    async def _claim_address(self, plan: AddressPlan, request: JoinRequest) -> str:
        for _ in range(16):
            records, _ = self.node.view.scan(SYSTEM_TABLE, IPAM_PREFIX, 1_000_000)
            taken = {plan.validate(k[len(IPAM_PREFIX) :].decode(), set()) for k, _ in records}
            address = str(plan.allocate(taken))
            key = IPAM_PREFIX + address.encode()
            (claim,) = await self.node.propose(
                [Put(SYSTEM_TABLE, key, request.host_id.encode(), expect_index=0)]
            )
            if claim.ok:
                return address
        raise JoinRefused("no_address", "could not claim an overlay address, retry")

    async def _add_raft_member(self, member: MemberRecord) -> None:
        """Grow the Raft cluster once the joiner is admitted (retried; idempotent)."""
        for attempt in range(ADD_MEMBER_ATTEMPTS):
            if member.raft in self.node.status().members:
                return
            current = self.node.view.get(SYSTEM_TABLE, member.key())
            if current is None:
                return  # revoked meanwhile
            try:
                await self.node.add_member(member.raft)
                logger.info("%s is a Raft member", member.host_id)
                return
            except ProposalError as exc:
                logger.warning(
                    "adding %s to Raft (attempt %d): %s", member.host_id, attempt + 1, exc
                )
                await asyncio.sleep(0.5)

    async def revoke(self, record: MemberRecord) -> None:
        """Cut a host: out of Raft, out of every peer's WireGuard, its token use spent."""
        marker = orjson.dumps(
            {"v": 1, "wg_public_key": record.wg_public_key or "", "at": time.time()}
        )
        revoked_key = REVOKED_PREFIX + record.host_id.encode()
        # The marker is written in static mode too: what the host knew is rotated on it.
        ops: list[Put | Delete] = [
            Delete(SYSTEM_TABLE, record.key()),
            Put(SYSTEM_TABLE, revoked_key, marker),
        ]
        if record.overlay_ip:
            ops.append(Delete(SYSTEM_TABLE, IPAM_PREFIX + record.overlay_ip.encode()))
        if record.raft in self.node.status().members:
            await self._remove_from_raft(record)
        await self.node.propose(ops, idempotent=True)
        if record.api and record.wg_public_key:
            self.spawn(self._notify_revoked(record), f"notify-revoked-{record.host_id}")

    async def _remove_from_raft(self, record: MemberRecord) -> None:
        """pysyncobj refuses to remove the leader: a leader being removed is first asked (its
        API, ``POST /v1/raft/step-down``) to hand leadership to another member."""
        deadline = time.monotonic() + MEMBERSHIP_RETRY_S
        while True:
            if self.node.status().leader_address == record.raft:
                await self._ask_to_step_down(record, deadline)
            try:
                await self.node.remove_member(record.raft, retry_s=REMOVE_ATTEMPT_S)
                return
            except NotCommittedError as exc:
                # Refused while a change or an election settles, or because it leads.
                if time.monotonic() > deadline:
                    raise
                logger.info("removing %s from Raft: %s; retrying", record.host_id, exc)

    async def _ask_to_step_down(self, record: MemberRecord, deadline: float) -> None:
        """Best effort, until ``deadline``: ask, wait a little for another leader, ask again
        (a hand-over is refused while no follower is caught up, and an election it starts
        can fail; one refusal must not cost the whole removal)."""
        while time.monotonic() < deadline:
            try:
                async with (
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                    session.post(
                        f"http://{record.api}/v1/raft/step-down",
                        headers={} if self.sign is None else dict(self.sign("POST", STEP_DOWN)),
                    ) as response,
                ):
                    logger.info("asked %s to step down: %s", record.host_id, response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                logger.info("could not ask %s to step down: %s", record.host_id, exc)
            asked_again_at = min(deadline, time.monotonic() + STEP_DOWN_ASK_S)
            while time.monotonic() < asked_again_at:
                if self.node.status().leader_address != record.raft:
                    return
                await asyncio.sleep(0.1)

    async def _notify_revoked(self, record: MemberRecord) -> None:
        """Best effort: tell the revoked host, which no longer hears from Raft, to stop."""
        notice = revocation_notice(self.site_identity(), self.site, record.host_id, time.time())
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.post(f"http://{record.api}/v1/revoked", data=notice) as response,
            ):
                logger.info("told %s it is revoked: %s", record.host_id, response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.info(
                "could not tell %s it is revoked (%s); it is cut anyway", record.host_id, exc
            )
