"""meshorch.promtext renders what prometheus-client's own parser reads back (pure)."""

from prometheus_client.core import GaugeMetricFamily as ClientGauge
from prometheus_client.parser import text_string_to_metric_families

from meshorch.promtext import (
    CONTENT_TYPE,
    CounterMetricFamily,
    GaugeMetricFamily,
    Histogram,
    Registry,
    render,
)


class Fixed:
    def __init__(self, *families: object) -> None:
        self.families = families

    def collect(self) -> tuple[object, ...]:
        return self.families


def parsed(registry: Registry) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    return {
        family.name: [(s.name, s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(render(registry).decode())
    }


def test_gauges_counters_and_labels_round_trip() -> None:
    gauge = GaugeMetricFamily("m_state", 'instances "by" state\nand more', labels=["state"])
    gauge.add_metric(['run\\ning "x"'], 3)
    counter = CounterMetricFamily("m_bytes", "bytes", value=2.5)
    registry = Registry()
    registry.register(Fixed(gauge, counter, GaugeMetricFamily("m_up", "up", value=1)))
    families = parsed(registry)
    assert families["m_state"] == [("m_state", {"state": 'run\\ning "x"'}, 3.0)]
    assert families["m_bytes"] == [("m_bytes_total", {}, 2.5)]
    assert families["m_up"] == [("m_up", {}, 1.0)]
    assert "version=0.0.4" in CONTENT_TYPE


def test_a_histogram_is_cumulative_with_count_and_sum() -> None:
    registry = Registry()
    histogram = Histogram("m_seconds", "latency", ["route"], buckets=(0.1, 1))
    registry.register(histogram)
    for value in (0.05, 0.1, 0.5, 7):
        histogram.labels("/v1/x").observe(value)
    samples = {(n, labels.get("le")): v for n, labels, v in parsed(registry)["m_seconds"]}
    assert samples[("m_seconds_bucket", "0.1")] == 2  # le: an observation on a bound counts
    assert samples[("m_seconds_bucket", "1.0")] == 3
    assert samples[("m_seconds_bucket", "+Inf")] == 4
    assert samples[("m_seconds_count", None)] == 4
    assert samples[("m_seconds_sum", None)] == 7.65


def test_prometheus_client_families_render_too_and_nothing_renders_empty() -> None:
    registry = Registry()
    assert render(registry) == b""
    family = ClientGauge("hub_sites", "sites", labels=["health"])
    family.add_metric(["ok"], 10)
    registry.register(Fixed(family))
    assert parsed(registry)["hub_sites"] == [("hub_sites", {"health": "ok"}, 10.0)]
