"""Prometheus ``GET /metrics`` of an agent: read from its state at scrape time.

One registry per agent (several agents can share a process in tests). The collector reads
Raft's status, the replicated state and this host's resources when scraped; API latency is
a histogram filled by a middleware.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from meshorch.apps.records import STATUS_PREFIX, InstanceReport
from meshorch.apps.resources import sample
from meshorch.fleet.site_link import SiteLink
from meshorch.promtext import CounterMetricFamily, GaugeMetricFamily
from meshorch.promtext import MetricFamily as Metric
from meshorch.state.ports import Members, SiteState
from meshorch.state.tables import APPS_TABLE
from meshorch.streams.site import SiteStreams


def _gauge(name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class AgentCollector:
    def __init__(
        self,
        site: SiteState,
        members: Members,
        link: SiteLink,
        streams: SiteStreams,
        data_dir: Path,
    ) -> None:
        self.site = site
        self.members = members
        self.link = link
        self.streams = streams
        self.data_dir = data_dir

    def collect(self) -> Iterator[Metric]:
        status = self.site.status()
        yield _gauge("meshorch_raft_term", "Raft term", status.term)
        yield _gauge("meshorch_raft_commit_index", "Raft commit index", status.commit_index)
        yield _gauge(
            "meshorch_raft_apply_lag",
            "Entries committed but not yet applied on this host",
            max(status.commit_index - status.applied_index, 0),
        )
        yield _gauge("meshorch_raft_is_leader", "1 on the site's leader", int(status.is_leader))
        members = self.members.members()
        yield _gauge("meshorch_site_hosts", "Hosts of the site", len(members))
        yield _gauge(
            "meshorch_site_hosts_reachable",
            "Hosts this agent hears from",
            len(self.members.reachable_hosts()),
        )
        trust = self.link.trust_state()
        yield _gauge(
            "meshorch_delta_version_applied",
            "The fleet delta version the site applied",
            0 if trust is None else trust.version,
        )
        states = GaugeMetricFamily(
            "meshorch_instances",
            "The site's instances by state and readiness",
            labels=["state", "ready"],
        )
        records, _ = self.site.view.scan(APPS_TABLE, STATUS_PREFIX, 1_000_000)
        counts = Counter(
            (report.state, str(report.ready).lower())
            for report in (InstanceReport.decode(r.value) for _, r in records)
        )
        for (state, ready), count in sorted(counts.items()):
            states.add_metric([state, ready], count)
        yield states
        yield from self._streams()
        gossip = self.link.gossip
        members_seen = 0 if gossip is None else len(gossip.status_json().get("members", {}))
        yield _gauge(
            "meshorch_gossip_members", "Other members this site's gossip knows", members_seen
        )
        resources = sample(self.data_dir, time.time())
        yield _gauge("meshorch_host_load1", "1-minute load average", resources.load1)
        yield _gauge(
            "meshorch_host_memory_used_bytes", "Memory in use", resources.memory_used_bytes
        )
        yield _gauge(
            "meshorch_host_disk_used_ratio",
            "Data directory disk use",
            resources.disk_used_pct / 100,
        )
        for direction, value in (
            ("receive", resources.net_rx_bytes),
            ("transmit", resources.net_tx_bytes),
        ):
            yield CounterMetricFamily(
                f"meshorch_host_network_{direction}_bytes",
                f"Bytes the host's interfaces {direction}d (not loopback)",
                value=value,
            )

    def _streams(self) -> Iterator[Metric]:
        backlog = GaugeMetricFamily(
            "meshorch_stream_backlog_events",
            "Events of a stream the hub has not acknowledged",
            labels=["stream"],
        )
        dropped = GaugeMetricFamily(
            "meshorch_stream_dropped_events",
            "Events retention dropped (cumulative)",
            labels=["stream"],
        )
        streams = self.streams
        for name in streams.names():
            status = streams.status(name)
            backlog.add_metric([name], max(status.last_seq - status.meta.forwarded_seq, 0))
            dropped.add_metric([name], status.meta.dropped_events)
        yield backlog
        yield dropped
