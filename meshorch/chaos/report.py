"""The chaos report: a JSON document and a timeline plot (an SVG written by hand, so no
plotting dependency). Times in both are seconds from the start of the workload."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

from meshorch.chaos.invariants import InvariantResult, Status, overall

REPORT_VERSION = 1


@dataclass(slots=True)
class FaultRecord:
    """A fault as planned and as it happened; ``recovery_s`` from heal to a healthy site
    (None: not measured, e.g. the next fault began first, or not recovered), and
    ``app_recovery_s`` from heal to the app's desired state."""

    kind: str
    roles: tuple[str, ...]
    planned_start_s: float
    planned_end_s: float
    targets: tuple[str, ...] = ()
    start_s: float | None = None
    end_s: float | None = None
    recovery_s: float | None = None
    note: str = ""
    leader_before: str | None = None  # when injected
    leader_after: str | None = None  # once recovered
    app_recovery_s: float | None = None  # heal -> the app converged again

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "roles": list(self.roles),
            "targets": list(self.targets),
            "planned": [self.planned_start_s, self.planned_end_s],
            "start_s": self.start_s,
            "end_s": self.end_s,
            "recovery_s": self.recovery_s,
            "app_recovery_s": self.app_recovery_s,
            "leader_before": self.leader_before,
            "leader_after": self.leader_after,
            "note": self.note,
        }


@dataclass(slots=True)
class ScenarioReport:
    scenario: str
    seed: int
    duration_s: float
    started_at: float  # unix time, for humans
    t0: float  # the monotonic time every other time is relative to
    faults: list[FaultRecord] = field(default_factory=list)
    invariants: list[InvariantResult] = field(default_factory=list)
    op_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    history_path: str = ""
    plot_path: str = ""
    app_recovery_s: float | None = None
    linearizability: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    durability: str = ""  # the agents' --durability
    lost_writes: int | None = None  # acknowledged writes a power cut took (None: no cut)

    @property
    def verdict(self) -> Status:
        if self.errors:
            return "fail"
        return overall(self.invariants) if self.invariants else "unknown"

    @property
    def recoveries(self) -> list[float]:
        return [f.recovery_s for f in self.faults if f.recovery_s is not None]

    @property
    def ops(self) -> int:
        return sum(sum(c.values()) for c in self.op_counts.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "scenario": self.scenario,
            "seed": self.seed,
            "durability": self.durability,
            "acknowledged_writes_lost": self.lost_writes,
            "duration_s": self.duration_s,
            "started_at": self.started_at,
            "verdict": self.verdict,
            "faults": [f.to_json() for f in self.faults],
            "recovery_max_s": max(self.recoveries, default=None),
            "app_recovery_s": self.app_recovery_s,
            "operations": self.op_counts,
            "history": self.history_path,
            "plot": self.plot_path,
            "invariants": [i.to_json() for i in self.invariants],
            "linearizability": self.linearizability,
            "errors": self.errors,
        }

    def summary(self) -> str:
        lines = [
            f"{self.scenario} seed={self.seed}"
            + (f" durability={self.durability}" if self.durability else "")
            + f": {self.verdict.upper()} "
            f"({self.ops} operations, {len(self.faults)} fault(s))"
        ]
        for f in self.faults:
            when = "not injected" if f.start_s is None else f"{f.start_s:.1f}s-{f.end_s or 0:.1f}s"
            rec = "-" if f.recovery_s is None else f"{f.recovery_s:.1f}s"
            if f.app_recovery_s is not None:
                rec += f" (app {f.app_recovery_s:.1f}s)"
            leaders = f"leader {f.leader_before or '?'} -> {f.leader_after or '?'}"
            lines.append(
                f"  fault {f.kind} {','.join(f.targets)} {when}, recovered in {rec}, {leaders}"
                + (f" ({f.note})" if f.note else "")
            )
        for i in self.invariants:
            lines.append(f"  {i.status:7} {i.name}: {i.detail.splitlines()[0] if i.detail else ''}")
        lines += [f"  error: {e}" for e in self.errors]
        return "\n".join(lines)


# --- the timeline plot -------------------------------------------------------------------

_COLOURS = {"ok": "#2e7d32", "fail": "#c62828", "unknown": "#f9a825"}
_FAULT_COLOURS = {
    "partition_pair": "#90caf9",
    "isolate": "#64b5f6",
    "uplink": "#ce93d8",
    "kill": "#ef9a9a",
    "pause": "#ffcc80",
    "kill_all": "#e57373",
    "power_cut": "#b71c1c",
}


def timeline_svg(
    report: ScenarioReport, records: Sequence[Mapping[str, Any]], *, width: int = 1000
) -> str:
    """Time on x; one lane per client, each operation a tick at its end, coloured by
    outcome; faults as translucent bands over all lanes, recovery as a hatched tail."""
    clients = sorted({str(r["client"]) for r in records}) or ["(none)"]
    lane_h, top, left, right = 18, 40, 90, 20
    height = top + lane_h * len(clients) + 50
    end_times = [float(r["end_s"]) - report.t0 for r in records]
    fault_ends = [
        (f.end_s or 0.0) + (f.recovery_s or 0.0) for f in report.faults if f.start_s is not None
    ]
    span = max([report.duration_s, *end_times, *fault_ends]) or 1.0
    scale = (width - left - right) / span

    def x(t: float) -> float:
        return left + max(0.0, t) * scale

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        '<defs><pattern id="rec" width="6" height="6" patternUnits="userSpaceOnUse" '
        'patternTransform="rotate(45)"><rect width="3" height="6" fill="#bdbdbd"/></pattern>'
        "</defs>",
        f'<text x="{left}" y="16" font-size="13">{escape(report.scenario)} seed={report.seed} '
        f"verdict={report.verdict} ops={len(records)}</text>",
    ]
    lanes_bottom = top + lane_h * len(clients)
    for f in report.faults:
        if f.start_s is None:
            continue
        x0, x1 = x(f.start_s), x(f.end_s if f.end_s is not None else span)
        colour = _FAULT_COLOURS.get(f.kind, "#b0bec5")
        label = escape(f"{f.kind} {','.join(f.targets)}")
        out.append(
            f'<rect x="{x0:.1f}" y="{top - 14}" width="{max(x1 - x0, 1):.1f}" '
            f'height="{lanes_bottom - top + 14}" fill="{colour}" fill-opacity="0.45">'
            f"<title>{label}: {f.start_s:.2f}s-{f.end_s}</title></rect>"
        )
        out.append(f'<text x="{x0 + 2:.1f}" y="{top - 3}" font-size="10">{label}</text>')
        if f.recovery_s:
            out.append(
                f'<rect x="{x1:.1f}" y="{top}" width="{f.recovery_s * scale:.1f}" '
                f'height="{lanes_bottom - top}" fill="url(#rec)" fill-opacity="0.6">'
                f"<title>recovery {f.recovery_s:.2f}s</title></rect>"
            )
    for i, client in enumerate(clients):
        y = top + i * lane_h
        out.append(f'<text x="4" y="{y + 13}">{escape(client)}</text>')
        out.append(
            f'<line x1="{left}" y1="{y + lane_h}" x2="{width - right}" y2="{y + lane_h}" '
            'stroke="#eeeeee"/>'
        )
    lane = {c: i for i, c in enumerate(clients)}
    for r in records:
        y = top + lane[str(r["client"])] * lane_h
        t = float(r["end_s"]) - report.t0
        colour = _COLOURS.get(str(r["status"]), "#000000")
        out.append(
            f'<line x1="{x(t):.1f}" y1="{y + 3}" x2="{x(t):.1f}" y2="{y + lane_h - 3}" '
            f'stroke="{colour}" stroke-width="1"/>'
        )
    # The time axis, a tick every "nice" step.
    step = next(s for s in (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1e9) if span / s <= 12)
    out.append(
        f'<line x1="{left}" y1="{lanes_bottom + 4}" x2="{width - right}" '
        f'y2="{lanes_bottom + 4}" stroke="#000"/>'
    )
    t = 0.0
    while t <= span + 1e-9:
        out.append(
            f'<line x1="{x(t):.1f}" y1="{lanes_bottom + 4}" x2="{x(t):.1f}" '
            f'y2="{lanes_bottom + 9}" stroke="#000"/>'
            f'<text x="{x(t):.1f}" y="{lanes_bottom + 21}" text-anchor="middle">{t:g}s</text>'
        )
        t += step
    legend_y = lanes_bottom + 40
    lx = left
    for status, colour in _COLOURS.items():
        out.append(
            f'<rect x="{lx}" y="{legend_y - 9}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{lx + 14}" y="{legend_y}">{status}</text>'
        )
        lx += 80
    out.append(
        f'<rect x="{lx}" y="{legend_y - 9}" width="10" height="10" fill="url(#rec)"/>'
        f'<text x="{lx + 14}" y="{legend_y}">recovery</text>'
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"
