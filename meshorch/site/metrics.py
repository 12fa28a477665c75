"""Prometheus ``GET /metrics`` of an agent: read from its state at scrape time.

One registry per agent (several agents can share a process in tests). The collector reads
Raft's status, the replicated state and this host's resources when scraped; API latency is
a histogram filled by a middleware.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from meshorch.apps.records import STATUS_PREFIX, InstanceReport
from meshorch.apps.resources import sample
from meshorch.state.tables import APPS_TABLE

if TYPE_CHECKING:
    from meshorch.site.agent import Agent

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("metrics_registry")
_LATENCY: web.AppKey[Histogram] = web.AppKey("metrics_latency")


def _gauge(name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class AgentCollector(Collector):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        status = agent.raft.status()
        yield _gauge("meshorch_raft_term", "Raft term", status.term)
        yield _gauge("meshorch_raft_commit_index", "Raft commit index", status.commit_index)
        yield _gauge(
            "meshorch_raft_apply_lag",
            "Entries committed but not yet applied on this host",
            max(status.commit_index - status.applied_index, 0),
        )
        yield _gauge("meshorch_raft_is_leader", "1 on the site's leader", int(status.is_leader))
        members = agent.members()
        yield _gauge("meshorch_site_hosts", "Hosts of the site", len(members))
        yield _gauge(
            "meshorch_site_hosts_reachable",
            "Hosts this agent hears from",
            len(agent.reachable_hosts()),
        )
        trust = agent.site_link.trust_state()
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
        records, _ = agent.raft.view.scan(APPS_TABLE, STATUS_PREFIX, 1_000_000)
        counts = Counter(
            (report.state, str(report.ready).lower())
            for report in (InstanceReport.decode(r.value) for _, r in records)
        )
        for (state, ready), count in sorted(counts.items()):
            states.add_metric([state, ready], count)
        yield states
        yield from self._streams()
        gossip = agent.site_link.gossip
        members_seen = 0 if gossip is None else len(gossip.status_json().get("members", {}))
        yield _gauge(
            "meshorch_gossip_members", "Other members this site's gossip knows", members_seen
        )
        resources = sample(agent.config.data_dir, time.time())
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
        streams = self.agent.streams
        for name in streams.names():
            status = streams.status(name)
            backlog.add_metric([name], max(status.last_seq - status.meta.forwarded_seq, 0))
            dropped.add_metric([name], status.meta.dropped_events)
        yield backlog
        yield dropped


def latency_histogram(registry: CollectorRegistry, prefix: str) -> Histogram:
    return Histogram(
        f"{prefix}_api_request_seconds",
        "API request latency by route and status class",
        ["route", "status"],
        registry=registry,
        buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    )


def install(app: web.Application, registry: CollectorRegistry, prefix: str) -> None:
    """``GET /metrics`` from ``registry`` and a latency histogram of every other route."""
    app[_REGISTRY] = registry
    app[_LATENCY] = latency_histogram(registry, prefix)
    app.middlewares.append(_timing)
    app.router.add_get("/metrics", _metrics)


@web.middleware
async def _timing(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        request.app[_LATENCY].labels(name, f"{status // 100}xx").observe(
            time.perf_counter() - started
        )


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
