"""The hub's settings (``HubConfig``) and their validation.

``python -m central_hub`` builds one from its flags (``central_hub.cli``); ``Hub`` checks
it on start and hands each of its parts the few settings that part uses.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from central_hub import interlock
from central_hub.alerts import Thresholds
from central_hub.deltaformat import Mode
from central_hub.errors import HubConfigError
from central_hub.keyfiles import Kek
from central_hub.model import is_id
from meshorch.fleet.client import GOSSIP_PRESETS

DAY_S = 86400.0


# Connections the kernel queues before the hub accepts them: thousands of sites reconnect
# or report at once after a deployment or a fail-over (aiohttp's default is 128).
LISTEN_BACKLOG = 4096


@dataclass
class HubConfig:
    """Settings of one hub. ``heartbeat_s`` None means ``delta_ttl_s / 4``; ``fleet`` None
    means the stored name (``"fleet"`` on first start). Gossip (UDP) listens on
    ``gossip_host`` (None: ``host``) and ``gossip_port`` (None: the same number as
    ``port``; 0 picks a free one) and tells sites ``gossip_advertise`` (None: that address;
    an unspecified host makes sites use their hub URL's host). Fleet logs are kept
    ``logs_max_age_s`` and within ``logs_max_bytes`` (None: no limit), checked every
    ``logs_retention_every_s``. The audit log keeps at most ``audit_max_entries`` entries
    no older than ``audit_max_age_s`` (None: no bound; ``central_hub.audit_retention``).
    A source address may fail ``auth_failure_burst`` authentications at once, then
    ``auth_failure_rate_per_s``, before its failures answer 429 (``central_hub.authguard``).
    The API is served over TLS (``central_hub.tls``): ``tls_cert``/``tls_key``, or a
    self-signed certificate in the data dir; plain HTTP only with ``insecure_http``.
    ``legacy_link_signatures`` accepts site signatures without a nonce (older agents) on
    the link's GET routes (``central_hub.api``).
    ``interlock`` says when a change that stops applications needs the operator's
    confirmation (``central_hub.interlock``).
    The delta log is compacted (``central_hub.snapshots``) every
    ``compact_every_s`` below what every enrolled site applied, or to its last
    ``delta_keep`` deltas (None: never compacted). ``delta_format`` is the format of the
    deltas issued (``central_hub.deltaformat``: ``auto``, 1 or 2). ``kek`` seals the key
    files of the data directory (``central_hub.keyfiles``; None: plain text)."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 7900
    fleet: str | None = None
    delta_ttl_s: float = 7 * DAY_S
    heartbeat_s: float | None = None
    wave_timeout_s: float = 600.0
    site_stale_s: float = 30.0
    alert_thresholds: Thresholds = field(default_factory=Thresholds)
    interlock: interlock.Thresholds = field(default_factory=interlock.Thresholds)
    enroll_ttl_s: float = 7 * DAY_S
    rejection_window_s: float = 600.0
    tick_s: float = 0.2
    max_body_bytes: int = 2 * 1024 * 1024
    gossip: bool = True
    gossip_host: str | None = None
    gossip_port: int | None = None
    gossip_advertise: tuple[str, int] | None = None
    gossip_preset: str = "wan"
    gossip_cert_ttl_s: float = 7 * DAY_S
    logs_max_age_s: float | None = 30 * DAY_S
    logs_max_bytes: int | None = None
    logs_retention_every_s: float = 60.0
    audit_max_entries: int | None = 1_000_000
    audit_max_age_s: float | None = 400 * DAY_S
    auth_failure_burst: float = 60.0
    auth_failure_rate_per_s: float = 5.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure_http: bool = False
    legacy_link_signatures: bool = True
    delta_keep: int | None = 100_000
    compact_every_s: float = 60.0
    delta_format: Mode = "auto"
    kek: Kek | None = None
    clock: Callable[[], float] = field(default=time.time)

    @property
    def gossip_address(self) -> tuple[str, int]:
        host = self.gossip_host if self.gossip_host is not None else self.host
        return host, self.port if self.gossip_port is None else self.gossip_port

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_s if self.heartbeat_s is not None else self.delta_ttl_s / 4

    def validate(self) -> None:
        """Raise HubConfigError listing every problem."""
        problems: list[str] = []
        if not self.host:
            problems.append("host: must not be empty")
        if not 0 <= self.port <= 65535:
            problems.append(f"port: {self.port} is not 0-65535")
        if self.fleet is not None and not is_id(self.fleet):
            problems.append(f"fleet: {self.fleet!r} must be 1-63 characters of a-z, 0-9 and '-'")
        positive = {
            "delta_ttl_s": self.delta_ttl_s,
            "heartbeat_s": self.heartbeat_interval_s,
            "wave_timeout_s": self.wave_timeout_s,
            "site_stale_s": self.site_stale_s,
            "enroll_ttl_s": self.enroll_ttl_s,
            "rejection_window_s": self.rejection_window_s,
            "tick_s": self.tick_s,
            "gossip_cert_ttl_s": self.gossip_cert_ttl_s,
            "logs_retention_every_s": self.logs_retention_every_s,
            "compact_every_s": self.compact_every_s,
        }
        if self.delta_keep is not None and self.delta_keep < 0:
            problems.append("delta_keep: must be >= 0")
        if not 0 <= self.interlock.fraction <= 1:
            problems.append("interlock fraction: must be 0-1")
        if self.interlock.max_sites < 0:
            problems.append("interlock max sites: must be >= 0")
        if self.logs_max_age_s is not None:
            positive["logs_max_age_s"] = self.logs_max_age_s
        if self.logs_max_bytes is not None:
            positive["logs_max_bytes"] = self.logs_max_bytes
        positive["auth_failure_burst"] = self.auth_failure_burst
        positive["auth_failure_rate_per_s"] = self.auth_failure_rate_per_s
        if self.audit_max_entries is not None:
            positive["audit_max_entries"] = self.audit_max_entries
        if self.audit_max_age_s is not None:
            positive["audit_max_age_s"] = self.audit_max_age_s
        problems += [f"{name}: must be > 0" for name, v in positive.items() if not v > 0]
        if self.heartbeat_interval_s >= self.delta_ttl_s:
            problems.append("heartbeat_s: must be shorter than delta_ttl_s (the tip expires)")
        if self.insecure_http and (self.tls_cert is not None or self.tls_key is not None):
            problems.append("insecure_http: not with a TLS certificate")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert, tls_key: give both or neither")
        if self.max_body_bytes < 64 * 1024:
            problems.append("max_body_bytes: at least 65536")
        if self.gossip:
            problems += _gossip_problems(self)
        if problems:
            raise HubConfigError("invalid hub configuration: " + "; ".join(problems))


def _gossip_problems(config: HubConfig) -> list[str]:
    problems = []
    host, port = config.gossip_address
    if not _is_ip(host):
        problems.append(f"gossip: {host!r} is not an IP address (give --gossip IP:PORT)")
    if not 0 <= port <= 65535:
        problems.append(f"gossip: port {port} is not 0-65535")
    if config.gossip_advertise is not None:
        adv_host, adv_port = config.gossip_advertise
        if not _is_ip(adv_host) or not 0 < adv_port <= 65535:
            problems.append(f"gossip_advertise: {config.gossip_advertise!r} is not IP:PORT")
    if config.gossip_preset not in GOSSIP_PRESETS:
        problems.append(f"gossip_preset: one of {', '.join(GOSSIP_PRESETS)}")
    return problems


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
