"""Prometheus metrics in the text exposition format (0.0.4), without prometheus-client.

The agent must stay under 50 MB (issue 19): prometheus-client's package import alone costs
it 1.4 MiB (every exposition server, WSGI and ASGI included), for what is a few gauges, two
counters and one histogram. This module has what ``GET /metrics`` needs: metric families
filled at scrape time (``GaugeMetricFamily``, ``CounterMetricFamily``: the same
constructor and ``add_metric`` as prometheus-client's), a ``Histogram`` with labels, a
``Registry`` of collectors, and ``render``. ``render`` reads any family with ``name``,
``documentation``, ``type`` and ``samples`` (``name``, ``labels``, ``value``), so
prometheus-client's families (the hub's collector) render the same way.

Counters follow prometheus-client: a family ``x`` has the sample ``x_total`` and is
declared as ``x_total``; ``*_created`` samples are not exposed.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


class MetricFamily:
    """One metric family and its samples."""

    def __init__(self, name: str, documentation: str, type_: str, labels: Sequence[str] = ()):
        self.name = name
        self.documentation = documentation
        self.type = type_
        self.samples: list[Sample] = []
        self._labels = tuple(labels)

    def add_sample(self, name: str, labels: dict[str, str], value: float) -> None:
        self.samples.append(Sample(name, labels, value))


class GaugeMetricFamily(MetricFamily):
    def __init__(
        self,
        name: str,
        documentation: str,
        value: float | None = None,
        labels: Sequence[str] = (),
    ) -> None:
        super().__init__(name, documentation, "gauge", labels)
        if value is not None:
            self.add_metric([], value)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        self.add_sample(self.name, dict(zip(self._labels, labels, strict=True)), value)


class CounterMetricFamily(MetricFamily):
    def __init__(
        self,
        name: str,
        documentation: str,
        value: float | None = None,
        labels: Sequence[str] = (),
    ) -> None:
        super().__init__(name.removesuffix("_total"), documentation, "counter", labels)
        if value is not None:
            self.add_metric([], value)

    def add_metric(self, labels: Sequence[str], value: float) -> None:
        labelled = dict(zip(self._labels, labels, strict=True))
        self.add_sample(f"{self.name}_total", labelled, value)


class Collector(Protocol):
    def collect(self) -> Iterable[Any]: ...


class Histogram:
    """A histogram by label values; ``labels(*values).observe(seconds)``."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = tuple(sorted(buckets))
        self._children: dict[tuple[str, ...], _Child] = {}
        self._lock = threading.Lock()

    def labels(self, *values: str) -> _Child:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self.name}: {len(self._labelnames)} label values expected")
        child = self._children.get(values)
        if child is None:
            with self._lock:
                child = self._children.setdefault(values, _Child(self._bounds))
        return child

    def collect(self) -> Iterable[MetricFamily]:
        family = MetricFamily(self.name, self.documentation, "histogram")
        for values, child in sorted(self._children.items()):
            labels = dict(zip(self._labelnames, values, strict=True))
            counts, total, count = child.snapshot()
            cumulative = 0
            for bound, bucket in zip((*self._bounds, math.inf), counts, strict=True):
                cumulative += bucket
                family.add_sample(
                    f"{self.name}_bucket", {**labels, "le": _number(bound)}, cumulative
                )
            family.add_sample(f"{self.name}_count", labels, count)
            family.add_sample(f"{self.name}_sum", labels, total)
        return [family]


class _Child:
    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self._bounds, value)] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[int], float, int]:
        with self._lock:
            return list(self._counts), self._sum, sum(self._counts)


class Registry:
    """The collectors ``GET /metrics`` reads, in the order registered."""

    def __init__(self) -> None:
        self._collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def collect(self) -> Iterable[Any]:
        for collector in list(self._collectors):
            yield from collector.collect()


def render(registry: Registry) -> bytes:
    """The text exposition of every family the registry's collectors give now."""
    lines: list[str] = []
    for family in registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        lines.append(f"# HELP {name} {_escape_help(family.documentation)}")
        lines.append(f"# TYPE {name} {family.type}")
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in sample.labels.items())
            selector = f"{{{labels}}}" if labels else ""
            lines.append(f"{sample.name}{selector} {_number(sample.value)}")
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
