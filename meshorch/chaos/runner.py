"""Runs chaos scenarios on a lab site (I/O: processes, namespaces, files, the clock).

``ChaosLab`` brings up one lab once -- a site of three hosts behind its NAT router, the
hub on the WAN with the site linked to it, a trivial process-runtime app -- and runs any
number of scenarios on it, healing between them. Each scenario:

1. waits until the site is healthy (every agent ready, one leader all agree on);
2. starts the workload inside the site router's namespace (clients on the shop LAN, so
   a host partition leaves them reaching every host);
3. injects and heals the seeded faults at their times, then measures each fault's
   recovery (heal -> healthy again) in the background;
4. after the workload, heals whatever is left (also on failure or Ctrl-C), waits for the
   site and the app, reads every key and the event stream once more;
5. checks the invariants and writes the report (JSON), the history (JSON lines) and the
   timeline (SVG).
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from meshorch.chaos.disks import DEFAULT_SIZE_MB, LossyDisks
from meshorch.chaos.faults import FaultInjector, resolve_roles
from meshorch.chaos.invariants import (
    DURABILITY_MODES,
    Durability,
    InvariantResult,
    check_acknowledged_writes,
    check_events,
    check_linearizable,
    check_recovery,
    count_losses,
    judge_power_cut,
    op_counts,
)
from meshorch.chaos.report import FaultRecord, ScenarioReport, timeline_svg
from meshorch.chaos.scenarios import get_scenario, plan_scenario
from meshorch.chaos.workload import DEFAULT_RESENDS
from meshorch.lab.agents import FleetFlags, LabAgents, LabHub
from meshorch.lab.lab import Lab

log = logging.getLogger(__name__)

SITE = "s1"
FLEET = "chaos"
APP_NAME = "chaosapp"
APP_REPLICAS = 2
STREAM_TENANT_APP = "chaos/wl"
POLL_S = 0.25
LEADER_LOOKAHEAD_S = 1.5
WORKER_START_S = 15.0  # a Python process importing aiohttp in a namespace, on a busy machine

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ChaosSettings:
    """How hard the workload pushes and how long recovery may take."""

    hosts: int = 3
    clients: int = 4
    keys: int = 6
    events: bool = True
    request_timeout_s: float = 8.0  # > the agent's 5 s commit timeout: 504s come back
    resends: int = DEFAULT_RESENDS  # of a write whose outcome is unknown, to another host
    recovery_timeout_s: float = 60.0
    app_bound_s: float = 60.0
    checker_budget: int = 2_000_000
    # "local" reads this host's copy, not linearizable: a negative control for the checker.
    read_consistency: str = "linearizable"
    # The agents' --durability, and so what a power cut may cost: "power", every
    # acknowledged write synced to disk (a loss fails the run); "process", a write
    # survives the death of the process only (a loss in a power cut is reported, allowed).
    # The lab's agents are started with it: a run cannot change it.
    durability: Durability = "power"
    disk_mb: int = DEFAULT_SIZE_MB  # each host's data disk (a sparse image)
    # Sync the hosts' disks once the lab is up, as on a site that has run for a while: a
    # power cut then costs only what the scenario wrote. False: the setup's files (the
    # agent's identity, keys) may not have reached the disk yet when the power goes.
    sync_setup: bool = True

    def last_operation_bound_s(self) -> float:
        """How long past its duration the workload may run: an operation started just
        before the end has each of its attempts (the first and every resend) time out,
        as when the site is back up but without a leader; plus the worker's own start."""
        return (1 + self.resends) * self.request_timeout_s + WORKER_START_S

    def validate(self) -> None:
        if self.hosts < 3:
            raise ValueError("chaos needs at least 3 hosts (a majority must survive a fault)")
        if self.clients < 1 or self.keys < 1:
            raise ValueError("at least one client and one key")
        if self.resends < 0:
            raise ValueError(f"resends cannot be negative, not {self.resends}")
        if self.read_consistency not in ("linearizable", "local"):
            raise ValueError(
                f"read consistency is linearizable or local, not {self.read_consistency!r}"
            )
        if self.durability not in DURABILITY_MODES:
            raise ValueError(f"durability is power or process, not {self.durability!r}")
        if self.disk_mb < 64:
            raise ValueError(f"a host's disk needs at least 64 MiB, not {self.disk_mb}")
        if min(self.request_timeout_s, self.recovery_timeout_s, self.app_bound_s) <= 0:
            raise ValueError("timeouts must be positive")


def app_spec() -> dict[str, Any]:
    return {
        "api_version": "meshorch/v1",
        "name": APP_NAME,
        "version": "1",
        "services": [
            {
                "name": "main",
                "replicas": APP_REPLICAS,
                "containers": [
                    {
                        "name": "main",
                        "image": "process",
                        "command": ["sh", "-c", "exec sleep 1000000"],
                        "resources": {"memory_limit": "16Mi", "cpu_request": 0.05},
                    }
                ],
            }
        ],
    }


def app_converged(view: Any) -> bool:
    if not isinstance(view, dict) or not isinstance(view.get("instances"), list):
        return False
    instances = view["instances"]
    return len(instances) == APP_REPLICAS and all(i.get("ready") for i in instances)


def site_healthy(probe: dict[str, Any], *, fleet: bool) -> bool:
    """Every agent answers ready, exactly one claims leadership and all name it."""
    statuses = probe.get("status") or {}
    if not statuses or any(not s or not s.get("ready") for s in statuses.values()):
        return False
    leaders = [s["host_id"] for s in statuses.values() if s.get("is_leader")]
    if len(leaders) != 1 or any(s.get("leader") != leaders[0] for s in statuses.values()):
        return False
    return not fleet or bool((probe.get("fleet") or {}).get("connected"))


def missing_links(probe: dict[str, Any]) -> list[str]:
    """Raft connections down between members ("h1 -> 10.0.0.3:7800"), from every status."""
    missing = []
    for host, s in sorted((probe.get("status") or {}).items()):
        if not s:
            continue
        reachable = set(s.get("reachable") or ())
        missing += [f"{host} -> {m['raft']}" for m in s["members"] if m["raft"] not in reachable]
    return missing


def site_whole(probe: dict[str, Any], *, fleet: bool) -> bool:
    """Healthy, and every member connected to every other: what a scenario starts from
    (one link left down by the last one would make the next one's results its doing)."""
    return site_healthy(probe, fleet=fleet) and not missing_links(probe)


def leader_of(probe: dict[str, Any]) -> str | None:
    for s in (probe.get("status") or {}).values():
        if s and s.get("is_leader"):
            return str(s["host_id"])
    return None


class ChaosLab:
    """A lab site for chaos runs; a context manager that always tears the lab down."""

    def __init__(
        self,
        state_dir: Path,
        *,
        prefix: str | None = None,
        settings: ChaosSettings | None = None,
        say: Say | None = None,
    ) -> None:
        self.settings = settings or ChaosSettings()
        self.settings.validate()
        self.say: Say = say or (lambda message: log.info("%s", message))
        self.lab = Lab(prefix or f"ch{secrets.token_hex(2)}", state_dir, progress=None)
        self.agents = LabAgents(
            self.lab, runtime="process", extra_args=["--durability", self.settings.durability]
        )
        # Every host's data directory on a disk that a power cut can take unsynced data from.
        self.disks = LossyDisks(self.lab.store.lab_dir / "disks", self.settings.disk_mb)
        self.hub: LabHub | None = None
        self.hosts: list[str] = []
        self.addresses: list[str] = []
        self.router_netns = ""

    # -- life cycle -----------------------------------------------------------------------

    def __enter__(self) -> ChaosLab:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def up(self) -> None:
        try:
            self.say(f"building lab {self.lab.prefix}: 1 site of {self.settings.hosts} hosts + hub")
            plan = self.lab.up(1, self.settings.hosts)
            self.hosts = [h.name for h in plan.hosts]
            self.addresses = [h.lan_ip for h in plan.hosts]
            self.router_netns = plan.site(1).router_netns
            for host in self.hosts:
                self.disks.create(host, self.lab.store.data_dir(host))
            self.say("starting the hub")
            self.hub = self.agents.start_hub(FLEET)
            created = self.agents.hub_request(self.hub, "POST", "/v1/sites", {"id": SITE})
            if not isinstance(created, dict) or "enroll_token" not in created:
                raise RuntimeError(f"the hub refused to register site {SITE}: {created}")
            self.agents.fleet = FleetFlags(
                self.hub.url, FLEET, self.hub.root_key, {SITE: created["enroll_token"]}
            )
            # The hub takes the workload's event stream only for a tenant it knows.
            tenant = STREAM_TENANT_APP.split("/")[0]
            answer = self.agents.hub_request(self.hub, "POST", "/v1/tenants", {"id": tenant})
            if not isinstance(answer, dict) or answer.get("id") != tenant:
                raise RuntimeError(f"the hub refused to create tenant {tenant}: {answer}")
            self.say("starting the agents (bootstrap, then joins)")
            self.agents.start_all()
            self.say(f"deploying {APP_NAME} ({APP_REPLICAS} process instances)")
            answer = self.agents.request(
                self.hosts[0], "POST", "/v1/apps", orjson.dumps(app_spec())
            )
            if not isinstance(answer, dict) or "error" in answer:
                raise RuntimeError(f"deploying {APP_NAME} failed: {answer}")
            if self.wait_for(lambda p: site_healthy(p, fleet=True) and app_converged(p["app"]),
                             self.settings.recovery_timeout_s) is None:  # fmt: skip
                raise RuntimeError(
                    "the site did not become healthy (agents, leader, hub link, app) within "
                    f"{self.settings.recovery_timeout_s:g}s; see the logs under "
                    f"{self.lab.store.lab_dir}"
                )
            if self.settings.sync_setup:
                self.disks.flush_all()
            self.say("lab ready")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            if self.lab.exists():
                try:
                    LabAgents(self.lab).teardown()
                except Exception as exc:
                    log.error("stopping the lab's agents: %s", exc)
            self.lab.down()
        finally:
            # After the lab: its processes are gone, nothing holds the disks any more.
            self.disks.remove_all()

    # -- talking to the site (from inside the router's namespace) -------------------------

    def _worker_argv(self, mode: str, *args: str) -> list[str]:
        return [
            "ip", "netns", "exec", self.router_netns, sys.executable, "-m",
            "meshorch.chaos.workload", mode, "--hosts", ",".join(self.addresses),
            "--token-file", str(self.agents.token_file), *args,
        ]  # fmt: skip

    def probe(self) -> dict[str, Any]:
        argv = self._worker_argv("probe", "--timeout", "2", "--app", APP_NAME, "--fleet")
        try:
            done = subprocess.run(argv, capture_output=True, timeout=15, check=False)
            result: dict[str, Any] = json.loads(done.stdout)
            return result
        except (subprocess.TimeoutExpired, ValueError):
            return {}

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout_s: float,
        stop: threading.Event | None = None,
    ) -> float | None:
        """Seconds until ``predicate(probe)`` holds; None on timeout (or ``stop``)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if stop is not None and stop.is_set():
                return None
            if predicate(self.probe()):
                return time.monotonic() - start
            time.sleep(POLL_S)
        return None

    # -- one scenario ---------------------------------------------------------------------

    def _check_events_at_hub(
        self, records: list[dict[str, Any]], stream: str, verified: dict[str, Any]
    ) -> InvariantResult:
        """The site forwards the stream to the hub: once it has caught up, the hub's copy
        must hold every acknowledged event exactly once too."""
        at_site = verified["events"]
        if at_site is None or self.hub is None:
            return InvariantResult(HUB_EVENTS, "unknown", "the site's stream could not be read")
        deadline = time.monotonic() + HUB_FORWARD_BOUND_S
        position = 0
        while True:
            answer = self.agents.hub_request(self.hub, "GET", "/v1/logs/streams")
            streams = answer.get("streams", []) if isinstance(answer, dict) else []
            position = max((s["position"] for s in streams
                            if s["site"] == SITE and s["stream"] == stream), default=0)  # fmt: skip
            if position >= len(at_site):
                break
            if time.monotonic() > deadline:
                return InvariantResult(
                    HUB_EVENTS, "fail", f"the hub holds {position} of the site's "
                    f"{len(at_site)} events {HUB_FORWARD_BOUND_S:g}s after the run",
                )  # fmt: skip
            time.sleep(0.5)
        texts: list[str] = []
        cursor: str | None = None
        while True:
            page = self.agents.hub_request(self.hub, "GET", _hub_page_path(stream, cursor))
            if not isinstance(page, dict) or "logs" not in page:
                return InvariantResult(HUB_EVENTS, "unknown", f"the hub's logs: {page}")
            texts += [str(hit["text"]) for hit in page["logs"]]
            cursor = page.get("next_cursor")
            if not cursor:
                return check_events(records, texts, name=HUB_EVENTS)

    def run_scenario(
        self,
        name: str,
        seed: int,
        duration_s: float,
        report_path: Path,
        settings: ChaosSettings | None = None,
    ) -> ScenarioReport:
        """Run ``name`` once; ``settings`` overrides the lab's for this run only."""
        scenario = get_scenario(name)
        planned = plan_scenario(name, seed, duration_s)
        settings = settings or self.settings
        settings.validate()
        if settings.durability != self.settings.durability:
            raise ValueError(
                f"the lab's agents run with --durability {self.settings.durability}; "
                f"a run cannot expect {settings.durability}"
            )
        fleet = scenario.needs_hub
        rng = random.Random(f"targets:{name}:{seed}")
        report_path.parent.mkdir(parents=True, exist_ok=True)
        history_path = report_path.with_suffix(".history.jsonl")
        history_path.unlink(missing_ok=True)
        plot_path = report_path.with_suffix(".svg")
        run_id = f"{name}-{seed}-{secrets.token_hex(3)}"
        key_prefix = f"chaos/{run_id}"
        stream = f"{STREAM_TENANT_APP}/{run_id}" if settings.events else ""

        self.say(f"[{name} seed={seed}] waiting for a healthy site")
        if self.wait_for(lambda p: site_whole(p, fleet=fleet), settings.recovery_timeout_s) is None:
            probe = self.probe()
            raise RuntimeError(
                f"the site is not healthy before {name}; not starting it "
                f"(Raft links down: {', '.join(missing_links(probe)) or 'none'})"
            )
        report = ScenarioReport(name, seed, duration_s, time.time(), time.monotonic())
        report.history_path, report.plot_path = str(history_path), str(plot_path)
        report.durability = self.settings.durability
        report.faults = [FaultRecord(f.kind, f.roles, f.start_s, f.end_s) for f in planned]
        injector = FaultInjector(self.lab, self.hosts, self.say, self.disks)
        watchers: list[tuple[threading.Thread, threading.Event]] = []
        worker: subprocess.Popen[bytes] | None = None
        targets: dict[int, tuple[str, ...]] = {}
        last_heal = report.t0

        def watch(record: FaultRecord, healed_at: float, stop: threading.Event) -> None:
            took = self.wait_for(lambda p: site_healthy(p, fleet=fleet),
                                 settings.recovery_timeout_s, stop)  # fmt: skip
            if took is not None:
                record.recovery_s = round(time.monotonic() - healed_at, 3)
                record.leader_after = leader_of(self.probe())
                # Then the app: its instances placed and ready again (often at once).
                left = settings.app_bound_s - (time.monotonic() - healed_at)
                if self.wait_for(lambda p: app_converged(p.get("app")), left, stop) is not None:
                    record.app_recovery_s = round(time.monotonic() - healed_at, 3)
            elif stop.is_set():
                record.note = "recovery not measured: the next fault began first"
            else:
                record.note = f"not recovered within {settings.recovery_timeout_s:g}s"

        observers: dict[int, threading.Event] = {}

        def notice(record: FaultRecord, cut_at: float, healed: threading.Event) -> None:
            """Did the site see its hub link go down? A cut nobody saw tests nothing."""
            took = self.wait_for(
                lambda p: not (p.get("fleet") or {}).get("connected", True), 3600, healed
            )
            record.note = (
                "the site never saw the hub link down during the cut"
                if took is None
                else f"the site saw the hub link down {time.monotonic() - cut_at:.1f}s into the cut"
            )

        worker_log = report_path.with_suffix(".worker.log")
        try:
            worker_args = [
                "--key-prefix", key_prefix, "--keys", str(settings.keys), "--stream", stream,
                "--clients", str(settings.clients), "--duration", str(duration_s),
                "--seed", str(seed), "--out", str(history_path),
                "--timeout", str(settings.request_timeout_s),
                "--retries", str(settings.resends),
                "--read-consistency", settings.read_consistency,
            ]  # fmt: skip
            with open(worker_log, "wb") as log_file:
                worker = subprocess.Popen(
                    self._worker_argv("run", *worker_args),
                    stdout=subprocess.DEVNULL,
                    stderr=log_file,
                )
            report.t0 = time.monotonic()
            steps = sorted(
                [(f.start_s, 1, i) for i, f in enumerate(planned)]
                + [(f.end_s, 0, i) for i, f in enumerate(planned)]
            )
            for at, inject, i in steps:
                fault, record = planned[i], report.faults[i]
                if inject:
                    # Ask who leads a little ahead: a probe takes a while on a busy machine.
                    _sleep_until(report.t0 + at - LEADER_LOOKAHEAD_S)
                    leader = leader_of(self.probe())
                    _sleep_until(report.t0 + at)
                    for _, stop in watchers:
                        stop.set()
                    targets[i] = resolve_roles(fault.roles, self.hosts, leader, SITE, rng)
                    record.targets = targets[i]
                    record.leader_before = leader
                    record.start_s = round(time.monotonic() - report.t0, 3)
                    injector.inject(fault, targets[i])
                    if fault.kind == "uplink":
                        observer = threading.Event()
                        observers[i] = observer
                        threading.Thread(
                            target=notice, args=(record, time.monotonic(), observer), daemon=True
                        ).start()
                else:
                    _sleep_until(report.t0 + at)
                    if i in observers:
                        observers.pop(i).set()
                    injector.heal(fault, targets[i])
                    last_heal = time.monotonic()
                    record.end_s = round(last_heal - report.t0, 3)
                    stop = threading.Event()
                    thread = threading.Thread(
                        target=watch, args=(record, last_heal, stop), daemon=True
                    )
                    thread.start()
                    watchers.append((thread, stop))
            self.say(f"[{name} seed={seed}] faults done; workload runs to {duration_s:g}s")
            try:
                worker.wait(timeout=max(0.0, report.t0 + duration_s - time.monotonic())
                            + settings.last_operation_bound_s())  # fmt: skip
            except subprocess.TimeoutExpired:
                report.errors.append("the workload did not stop in time; terminated")
        except Exception as exc:
            report.errors.append(f"{type(exc).__name__}: {exc}")
            log.exception("scenario %s failed", name)
        finally:
            for observer in observers.values():
                observer.set()
            # Heal first, even on Ctrl-C: a lab left partitioned poisons the next scenario.
            try:
                injector.heal_everything()
            except Exception as exc:
                report.errors.append(f"healing: {exc}")
            if worker is not None and worker.poll() is None:
                worker.terminate()
                try:
                    worker.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    worker.kill()
                    worker.wait()
        for thread, _ in watchers:
            thread.join(settings.recovery_timeout_s + 20)

        self.say(f"[{name} seed={seed}] waiting for the site and {APP_NAME} to settle")
        settled = self.wait_for(lambda p: site_healthy(p, fleet=fleet), settings.recovery_timeout_s)
        # The app's bound is checked per fault (by the watchers); here only that it is
        # converged in the end, and when no watcher measured it, since the last heal.
        app_s = self.wait_for(lambda p: app_converged(p.get("app")), settings.app_bound_s)
        measured = [f.app_recovery_s for f in report.faults if f.app_recovery_s is not None]
        if app_s is not None:
            report.app_recovery_s = (
                max(measured) if measured else round(time.monotonic() - last_heal, 3)
            )
        if settled is None:
            report.errors.append(
                f"the site was not healthy within {settings.recovery_timeout_s:g}s"
            )

        records = _read_history(history_path)
        verify_args = [
            "--key-prefix", key_prefix, "--keys", str(settings.keys), "--stream", stream,
            "--timeout", "30",
        ]  # fmt: skip
        verified: dict[str, Any] = {"reads": [], "events": None, "problems": []}
        try:
            done = subprocess.run(
                self._worker_argv("verify", *verify_args), capture_output=True, timeout=120
            )
            verified = json.loads(done.stdout)
        except (subprocess.TimeoutExpired, ValueError) as exc:
            report.errors.append(f"final reads failed: {exc}")
        report.errors += [f"final reads: {p}" for p in verified["problems"]]
        final_reads = verified["reads"]
        with open(history_path, "ab") as fh:
            for r in final_reads:
                fh.write(orjson.dumps(r) + b"\n")

        self.say(f"[{name} seed={seed}] checking invariants on {len(records)} operations")
        linear, verdict = check_linearizable([*records, *final_reads], t0=report.t0,
                                             budget_nodes=settings.checker_budget)  # fmt: skip
        report.linearizability = verdict.to_json()
        keys = [f"{key_prefix}/k{i}" for i in range(settings.keys)]
        report.invariants = [linear, check_acknowledged_writes(records, final_reads, keys)]
        if settings.events:
            report.invariants.append(check_events(records, verified["events"]))
            report.invariants.append(self._check_events_at_hub(records, stream, verified))
        if any(f.kind == "power_cut" for f in planned):
            stored = verified["events"] if settings.events else None
            report.lost_writes = sum(count_losses(records, final_reads, keys, stored))
            report.invariants = judge_power_cut(
                report.invariants, settings.durability, records, final_reads, keys, stored
            )
        report.invariants += [
            check_recovery("site_recovered", _max_or_none(report), settings.recovery_timeout_s),
            check_recovery("app_desired_state", report.app_recovery_s, settings.app_bound_s),
        ]
        report.op_counts = op_counts(records)
        report_path.write_bytes(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2))
        plot_path.write_text(timeline_svg(report, [*records, *final_reads]))
        return report


HUB_EVENTS = "events_at_hub_exactly_once"
HUB_FORWARD_BOUND_S = 60.0


def _hub_page_path(stream: str, cursor: str | None) -> str:
    query = {"site": SITE, "stream": stream, "limit": "1000"}
    if cursor:
        query["cursor"] = cursor
    return "/v1/logs?" + urllib.parse.urlencode(query)


def _max_or_none(report: ScenarioReport) -> float | None:
    """The slowest recovery; None when a fault that ended last never recovered."""
    measured = [f for f in report.faults if f.start_s is not None]
    if not measured:
        return 0.0
    if measured[-1].recovery_s is None:
        return None
    return max(report.recoveries)


def _sleep_until(deadline: float) -> None:
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, 0.2))  # short naps: Ctrl-C is seen at once


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            continue  # a worker killed mid-line leaves half a line at the end
    return out


def run_scenarios(
    lab: ChaosLab,
    runs: Sequence[tuple[str, int]],
    duration_s: float,
    report_dir: Path,
) -> list[ScenarioReport]:
    """Several scenarios one after the other on the same lab."""
    return [
        lab.run_scenario(name, seed, duration_s, report_dir / f"{name}-seed{seed}.json")
        for name, seed in runs
    ]
