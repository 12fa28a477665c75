"""One agent on its own in the test process: the config the fleet, secret and quota tests share."""

from __future__ import annotations

from pathlib import Path

from nacl.signing import SigningKey

from meshorch.agent_config import AgentConfig
from meshorch.delta import key_id
from meshorch.localsite import free_port


def lone_agent_config(tmp_path: Path, site: str, fleet: str, root: SigningKey) -> AgentConfig:
    """A single-host agent trusting ``root``; its hub URL leads nowhere (deltas come by relay)."""
    return AgentConfig(
        site=site,
        host_id="h1",
        data_dir=tmp_path / "h1",
        api_address=f"127.0.0.1:{free_port()}",
        raft_address=f"127.0.0.1:{free_port()}",
        password="p" * 32,
        preset="local",
        hub=f"http://127.0.0.1:{free_port()}",
        fleet=fleet,
        fleet_key=key_id(root),
    )
