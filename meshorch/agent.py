"""The agent: one per host. Runs the site's Raft member and serves the site API."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from meshorch.agent_config import AgentConfig, check_identity
from meshorch.site_state import MEMBER_PREFIX, SITE_TABLES, SYSTEM_TABLE, MemberRecord
from raft import Put, RaftConfig, RaftNode, local_preset
from raft.errors import ProposalError

logger = logging.getLogger(__name__)

REGISTER_RETRY_S = 0.5


class Agent:
    """Async context manager: ``async with Agent(config) as agent: ...``."""

    def __init__(self, config: AgentConfig) -> None:
        config.validate()
        check_identity(config)
        self.config = config
        preset = local_preset() if config.preset == "local" else {}
        self.raft = RaftNode(
            RaftConfig(
                self_address=config.raft_address,
                partners=config.peers,
                data_dir=config.data_dir / "raft",
                password=config.password,
                tables=SITE_TABLES,
                **preset,  # type: ignore[arg-type]
            )
        )
        self._runner: web.AppRunner | None = None
        self._register_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        from meshorch.api import build_app  # the API module imports this one

        await self.raft.start()
        self._runner = web.AppRunner(build_app(self), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.api_host, self.config.api_port)
        await site.start()
        self._register_task = asyncio.create_task(self._register_self(), name="register-self")
        logger.info(
            "agent %s of site %s: api http://%s, raft %s",
            self.config.host_id,
            self.config.site,
            self.config.api_address,
            self.config.raft_address,
        )

    async def stop(self) -> None:
        if self._register_task is not None:
            self._register_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._register_task
        if self._runner is not None:
            await self._runner.cleanup()
        await self.raft.stop()

    def members(self) -> list[MemberRecord]:
        records, _ = self.raft.view.scan(SYSTEM_TABLE, MEMBER_PREFIX, 10_000)
        return [MemberRecord.decode(record.value) for _, record in records]

    async def _register_self(self) -> None:
        """Record this host's ids and addresses in the replicated state (idempotent)."""
        me = MemberRecord(self.config.host_id, self.config.raft_address, self.config.api_address)
        while True:
            current = self.raft.view.get(SYSTEM_TABLE, me.key())
            if current is not None and MemberRecord.decode(current.value) == me:
                return
            try:
                await self.raft.propose([Put(SYSTEM_TABLE, me.key(), me.encode())])
                logger.info("registered %s in the site state", me.host_id)
                return
            except ProposalError as exc:
                logger.debug("registration not committed yet: %s", exc)
                await asyncio.sleep(REGISTER_RETRY_S)
