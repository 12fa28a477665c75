"""A host short of disk or memory sheds its lowest-priority work (a local action).

Every few seconds the agent samples its host (``meshorch.apps.resources``). Over the
threshold, it advertises a little less memory capacity than its instances request; the
scheduler then keeps the higher priorities and moves the lowest-priority instance elsewhere
(``meshorch.apps.scheduler``: kept placements are taken by priority; the move is an app event).
One instance per check, for as long as the pressure lasts; back under the threshold by
``HYSTERESIS_PCT`` the host advertises its full capacity again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

from meshorch.apps.records import (
    INST_PREFIX,
    decode_hostinfo,
    decode_placement,
    encode_hostinfo,
    hostinfo_key,
)
from meshorch.apps.resources import HostResources, sample
from meshorch.apps.scheduler import HostInfo
from meshorch.state.ports import SiteState
from meshorch.state.tables import APPS_TABLE
from raft import Put
from raft.errors import ProposalError

logger = logging.getLogger(__name__)

CHECK_S = 5.0
HYSTERESIS_PCT = 5.0
Sampler = Callable[[Path, float], HostResources]


class PressureGuard:
    def __init__(
        self,
        site: SiteState,
        host_id: str,
        data_dir: Path,
        normal: HostInfo,
        threshold_pct: float,
        *,
        check_s: float = CHECK_S,
        sampler: Sampler = sample,
    ) -> None:
        self.site = site
        self.host_id = host_id
        self.data_dir = data_dir
        self.normal = normal  # what this host offers when not short of anything
        self.threshold_pct = threshold_pct
        self.check_s = check_s
        self.sampler = sampler
        self.evictions = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            try:
                await self.check()
            except ProposalError as exc:
                logger.debug("pressure check not committed: %s", exc)

    async def check(self) -> None:
        site, me = self.site, self.host_id
        use = self.sampler(self.data_dir, time.time())
        worst = max(use.disk_used_pct, use.memory_used_pct)
        record = site.view.get(APPS_TABLE, hostinfo_key(me))
        if record is None:
            return
        advertised = decode_hostinfo(record.value, alive=True)
        normal = self.normal
        if worst >= self.threshold_pct:
            placed = [
                p
                for p in (
                    decode_placement(r.value)
                    for _, r in site.view.scan(APPS_TABLE, INST_PREFIX, 1_000_000)[0]
                )
                if p.host_id == me
            ]
            committed = sum(p.memory_bytes for p in placed)
            if not placed or advertised.memory_bytes < committed:
                return  # nothing to shed, or the last step is still being acted on
            why = f"disk {use.disk_used_pct:.0f}%, memory {use.memory_used_pct:.0f}% used"
            shrunk = dataclasses.replace(advertised, memory_bytes=max(committed - 1, 0))
            await site.propose([Put(APPS_TABLE, hostinfo_key(me), encode_hostinfo(shrunk))])
            self.evictions += 1
            logger.warning("host pressure: %s; shedding the lowest-priority instance", why)
        elif (
            worst < self.threshold_pct - HYSTERESIS_PCT
            and advertised.memory_bytes != normal.memory_bytes
        ):
            await site.propose([Put(APPS_TABLE, hostinfo_key(me), encode_hostinfo(normal))])
            logger.info("host pressure over: full capacity again")
