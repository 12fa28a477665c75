"""Prometheus ``GET /metrics`` of the hub, read from its state at scrape time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from central_hub.parts import HubParts


class HubCollector(Collector):
    def __init__(self, hub: HubParts) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self.hub
        sites = hub.sites.list_sites()
        by_health = GaugeMetricFamily("meshorch_hub_sites", "Sites by health", labels=["health"])
        for health, count in sorted(Counter(str(s["health"]) for s in sites).items()):
            by_health.add_metric([health], count)
        yield by_health
        head = hub.ledger.head.version
        yield _gauge("meshorch_hub_delta_head", "The newest delta version", head)
        behind = GaugeMetricFamily(
            "meshorch_hub_site_deltas_behind", "Deltas a site has not applied yet", labels=["site"]
        )
        for site in sites:
            behind.add_metric([site["id"]], max(head - (site.get("applied_version") or 0), 0))
        yield behind
        yield _gauge(
            "meshorch_hub_link_waiters", "Sites' long-polls open now", hub.ledger.link_waiters
        )
        alerts = GaugeMetricFamily(
            "meshorch_hub_alerts_active", "Active alerts by kind", labels=["kind"]
        )
        for kind, count in sorted(
            Counter(a.kind for a in hub.alerting.book.active.values()).items()
        ):
            alerts.add_metric([kind], count)
        yield alerts
        logs = hub.logs.stats()
        if logs is not None:
            yield _gauge(
                "meshorch_hub_logs_stored_bytes",
                "Bytes of fleet logs the hub stores (blocks and their share of the index)",
                logs.stored_bytes,
            )
            yield _gauge("meshorch_hub_logs_records", "Fleet log records stored", logs.records)
            yield CounterMetricFamily(
                "meshorch_hub_logs_retention_dropped_records",
                "Fleet log records the hub's retention dropped (--logs-max-age/-bytes)",
                value=logs.hub_dropped,
            )
            yield CounterMetricFamily(
                "meshorch_hub_logs_site_dropped_records",
                "Fleet log records the sites' retention dropped before forwarding them",
                value=logs.site_dropped,
            )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
