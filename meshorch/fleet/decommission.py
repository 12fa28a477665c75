"""Decommissioning a site: stop its work, wipe its secrets, tell the hub (docs/upgrades.md).

A ``site.decommission`` delta from the hub writes two records in one Raft entry: the
secrets lock-down (every host drops its keys at once, stops serving secrets and starts
nothing new) and ``site/decommission``. The leader then deletes every application (the
hosts stop their instances and remove their secret files) and every encrypted secret,
data key and the keyring from the replicated state (``stopping``), and marks the record
``done`` once no instance is placed any more. The site report carries the state; the hub forgets
the site when it reads ``done``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson

from meshorch.apps.records import APP_PREFIX, INST_PREFIX
from meshorch.secrets import keyring as secrets
from meshorch.state.ports import SiteState
from meshorch.state.tables import APPS_TABLE, SECRETS_TABLE, SYSTEM_TABLE
from raft import Delete, Put, StateView

logger = logging.getLogger(__name__)

OP = "site.decommission"
DECOMMISSION_KEY = b"site/decommission"
CHECK_S = 1.0
# The secrets, their data keys and the keyring; the lock-down record stays, and so do the
# hosts' public keys (nothing secret, and each host registers its own again).
_SECRET_PREFIXES = (secrets.SECRET_PREFIX, secrets.DK_PREFIX)
_SECRET_KEYS = (secrets.RING_KEY, secrets.DKSTATE_KEY, secrets.ROTATE_KEY)


def op_writes(version: int) -> list[Put]:
    record = orjson.dumps({"v": 1, "version": version, "state": "running"})
    return [
        Put(SECRETS_TABLE, secrets.LOCKDOWN_KEY, secrets.encode_flag("decommission")),
        Put(SYSTEM_TABLE, DECOMMISSION_KEY, record),
    ]


def state(view: StateView) -> dict[str, Any] | None:
    record = view.get(SYSTEM_TABLE, DECOMMISSION_KEY)
    return None if record is None else dict(orjson.loads(record.value))


async def run(site: SiteState) -> None:
    """The leader's part; every host runs it, only the leader acts."""
    while True:
        await asyncio.sleep(CHECK_S)
        try:
            current = state(site.view)
            if current is None or current["state"] == "done":
                continue
            if site.status().is_leader:
                await step(site, current)
        except Exception as exc:  # tried again at the next check
            logger.warning("decommission: %s", exc)


async def step(site: SiteState, current: dict[str, Any]) -> None:
    """running: delete the apps and the secrets (one entry, once) -> stopping: wait until
    no instance is placed -> done."""
    view = site.view
    if current["state"] == "running":
        apps, _ = view.scan(APPS_TABLE, APP_PREFIX, 100_000)
        ops: list[Put | Delete] = [Delete(APPS_TABLE, key) for key, _ in apps]
        for prefix in _SECRET_PREFIXES:
            found, _ = view.scan(SECRETS_TABLE, prefix, 100_000)
            ops += [Delete(SECRETS_TABLE, key) for key, _ in found]
        ops += [Delete(SECRETS_TABLE, key) for key in _SECRET_KEYS if view.get(SECRETS_TABLE, key)]
        stopping = orjson.dumps({**current, "state": "stopping"})
        ops.append(Put(SYSTEM_TABLE, DECOMMISSION_KEY, stopping))
        logger.warning("decommission: deleting %d applications and the site's secrets", len(apps))
        await site.propose(ops, idempotent=True)
        return
    placed, _ = view.scan(APPS_TABLE, INST_PREFIX, 1)
    if placed:
        return  # the controller is still removing placements; hosts stop their instances
    done = orjson.dumps({**current, "state": "done"})
    await site.propose([Put(SYSTEM_TABLE, DECOMMISSION_KEY, done)], idempotent=True)
    logger.warning("decommission: done; the site runs nothing and holds no secret")
