"""Agents for tests: one on its own in the test process (the config the fleet, secret and
quota tests share), and a site of agents linked to an in-process hub."""

from __future__ import annotations

from pathlib import Path

from nacl.signing import SigningKey

from central_hub import Hub
from meshorch.demo.localsite import LocalSite, free_port
from meshorch.fleet.delta import key_id
from meshorch.lab.agents import FleetFlags
from meshorch.site.config import AgentConfig
from meshorch.state.peer_auth import PeerSigner, load_or_create_key
from tests.agent_token import TOKEN


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
        operator_token_file=token_file(tmp_path),
    )


def token_file(directory: Path) -> Path:
    """A file holding the tests' admin token, for an agent's ``operator_token_file``."""
    path = directory / "operator.token"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(TOKEN + "\n")
    return path


def peer_headers(data_dir: Path, host_id: str, method: str, path_qs: str) -> dict[str, str]:
    """What a request of member ``host_id`` (its peer key in ``data_dir``) to a peer route
    carries: the host's signature, as its agent would send it."""
    return PeerSigner(host_id, load_or_create_key(data_dir)).headers(method, path_qs)


def linked_site(
    root: Path, hub: Hub, site_id: str, enroll_token: str, *, via: str | None = None, hosts: int = 3
) -> LocalSite:
    """Agents of ``site_id`` on loopback that link to ``hub`` (through ``via``, e.g. an
    uplink relay's URL) and enroll with ``enroll_token``; not started yet."""
    flags = FleetFlags(via or hub.url, hub.fleet, hub.root_key, {site_id: enroll_token})
    return LocalSite(hosts=hosts, site=site_id, root=root, extra_args=flags.argv(site_id))
