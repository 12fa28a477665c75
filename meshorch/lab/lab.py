"""The lab: builds a planned topology for real and manages its processes and partitions.

Each operation loads the persisted state, decides with the pure modules (``plan``,
``commands``, ``partition``), acts through ``system`` and saves the state again, so any
separate invocation (the CLI) can pick up where the last one stopped.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from meshorch.lab.commands import (
    Argv,
    host_commands,
    iptables,
    plan_stages,
    render_command,
    teardown_commands,
)
from meshorch.lab.errors import LabError, LabLookupError, LabPlanError, LabStateError
from meshorch.lab.parse import parse_net_dev
from meshorch.lab.partition import partition_tag, plan_partition, rules_to_delete
from meshorch.lab.plan import (
    DEFAULT_PREFIX,
    HostPlan,
    LabPlan,
    lab_links_in,
    lab_namespaces_in,
    plan_add_host,
    plan_lab,
    plan_lab_from_counts,
    validate_prefix,
)
from meshorch.lab.state import LabState, ProcessRecord, StateStore, default_state_dir
from meshorch.lab.status import LabStatus, NodeStatus, ProcessStatus
from meshorch.lab.system import (
    CommandResult,
    Runner,
    SubprocessRunner,
    iptables_rules,
    kill_pids,
    kill_process,
    list_links,
    list_netns,
    netns_pids,
    process_alive,
    require_root,
    start_process,
)

log = logging.getLogger(__name__)

DEFAULT_KILL_TIMEOUT_S = 10.0
# How long a freshly started process must survive before `up` calls it started; catches
# a wrong command early without slowing every start.
START_GRACE_S = 0.5

Progress = Callable[[str], None]


class Lab:
    """One lab, named by its prefix, whose state lives in ``state_dir``.

    Usable as a context manager that tears the lab down on exit.
    """

    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        state_dir: Path | None = None,
        *,
        runner: Runner | None = None,
        progress: Progress | None = None,
        kill_timeout_s: float = DEFAULT_KILL_TIMEOUT_S,
    ) -> None:
        self.prefix = validate_prefix(prefix)
        self.store = StateStore(state_dir or default_state_dir(), prefix)
        self.runner: Runner = runner or SubprocessRunner()
        self._progress = progress
        self.kill_timeout_s = kill_timeout_s

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def _say(self, message: str) -> None:
        # debug: the progress callback already shows it to the user.
        log.debug("lab %s: %s", self.prefix, message)
        if self._progress is not None:
            self._progress(message)

    # --- reading ---------------------------------------------------------------------

    def load(self) -> tuple[LabState, LabPlan]:
        state = self.store.load()
        return state, plan_lab_from_counts(state.prefix, state.site_hosts)

    @property
    def plan(self) -> LabPlan:
        return self.load()[1]

    def exists(self) -> bool:
        return self.store.exists()

    # --- building --------------------------------------------------------------------

    def up(
        self,
        sites: int,
        hosts_per_site: int,
        *,
        agent_cmd: str | None = None,
        hub_cmd: str | None = None,
    ) -> LabPlan:
        """Build the topology, then start ``agent_cmd`` on every host (and ``hub_cmd``)."""
        require_root()
        plan = plan_lab(sites, hosts_per_site, self.prefix)
        with self.store.locked():
            self._refuse_existing()
            state = LabState(self.prefix, list(plan.site_hosts), "building", agent_cmd, hub_cmd)
            # Check the templates before building anything.
            for node in self._process_nodes(plan, state):
                self._render(plan, state, node)
            self.store.save(state)  # first: a crash from here on is found by `down`
            try:
                for label, cmds in plan_stages(plan):
                    self._say(f"creating {label}")
                    self._run_all(cmds)
                state.phase = "up"
                self.store.save(state)
                started = []
                for node in self._process_nodes(plan, state):
                    started.append(self._start(plan, state, node))
                self._check_started(started)
            except BaseException:
                # Also on Ctrl-C: a half-built lab is worse than none.
                self._say("build failed, tearing down what was built")
                try:
                    self._down(keep_logs=True)
                except LabError as cleanup_exc:
                    log.error("cleanup after failed build failed too: %s", cleanup_exc)
                raise
        self._say(
            f"lab {self.prefix} is up: {len(plan.sites)} site(s), {len(plan.hosts)} host(s), "
            f"hub {plan.hub_ip} in netns {plan.hub_netns}"
        )
        return plan

    def _refuse_existing(self) -> None:
        if self.store.exists():
            raise LabStateError(
                f"lab {self.prefix!r} already exists (state {self.store.path}); "
                f"run 'lab down --prefix {self.prefix}' first"
            )
        leftovers = lab_namespaces_in(self.prefix, list_netns(self.runner))
        if leftovers:
            raise LabStateError(
                f"leftovers of lab {self.prefix!r} exist ({', '.join(leftovers)}); "
                f"run 'lab down --prefix {self.prefix}' first"
            )

    def add_host(self, site: str | int) -> HostPlan:
        """Add one host to ``site`` and start its agent, if the lab has an agent command."""
        require_root()
        with self.store.locked():
            state, plan = self.load()
            plan, host = plan_add_host(plan, site)
            old_counts = list(state.site_hosts)
            state.site_hosts = list(plan.site_hosts)
            self.store.save(state)  # first, so `down` also removes a half-added host
            self._say(f"creating host {host.name} {host.lan_ip}")
            try:
                self._run_all(host_commands(plan, host))
            except BaseException:
                self.runner.run(["ip", "netns", "del", host.netns], check=False)
                state.site_hosts = old_counts
                self.store.save(state)
                raise
            if state.agent_cmd is not None:
                self._check_started([self._start(plan, state, host.name)])
        return host

    def _run_all(self, cmds: Sequence[Argv]) -> None:
        for argv in cmds:
            self.runner.run(argv)

    # --- processes -------------------------------------------------------------------

    def _process_nodes(self, plan: LabPlan, state: LabState) -> list[str]:
        nodes = ["hub"] if state.hub_cmd is not None else []
        if state.agent_cmd is not None:
            nodes += [h.name for h in plan.hosts]
        return nodes

    def _render(self, plan: LabPlan, state: LabState, node: str) -> Argv:
        if node == "hub":
            template, site, ip, netns = state.hub_cmd, "", plan.hub_ip, plan.hub_netns
        else:
            host = plan.host(node)
            template, site, ip = state.agent_cmd, f"s{host.site}", host.lan_ip
            netns = host.netns
        if template is None:
            raise LabLookupError(f"lab {self.prefix!r} has no command for {node}")
        argv = render_command(
            template,
            {
                "site": site,
                "host": node,
                "lan_ip": ip,
                "data_dir": str(self.store.data_dir(node)),
                "netns": netns,
                "hub_ip": plan.hub_ip,
                "prefix": plan.prefix,
            },
        )
        if shutil.which(argv[0]) is None:
            raise LabPlanError(f"command for {node} not found: {argv[0]!r}")
        return argv

    def _start(
        self, plan: LabPlan, state: LabState, node: str, argv: Sequence[str] | None = None
    ) -> ProcessRecord:
        argv = self._render(plan, state, node) if argv is None else argv
        self.store.data_dir(node).mkdir(parents=True, exist_ok=True)
        record = start_process(node, plan.node(node).netns, argv, self.store.log_path(node))
        state.processes[node] = record
        self.store.save(state)
        self._say(f"started {node}: pid {record.pid}, log {record.log}")
        return record

    def _check_started(self, records: Sequence[ProcessRecord]) -> None:
        if not records:
            return
        time.sleep(START_GRACE_S)
        for rec in records:
            if not process_alive(rec):
                self._say(f"WARNING: {rec.node}'s process (pid {rec.pid}) exited at once:")
                self._say(_tail(Path(rec.log)))

    def start(self, node: str, argv: Sequence[str]) -> ProcessRecord:
        """Start ``argv`` in ``node`` (a host or ``hub``), replacing its recorded process.

        Killing it is then up to ``kill``/``down``; ``restart`` reruns ``argv``.
        """
        require_root()
        with self.store.locked():
            state, plan = self.load()
            plan.node(node)  # raise early on an unknown node
            old = state.processes.get(node)
            if old is not None and process_alive(old):
                raise LabStateError(f"{node} already runs pid {old.pid}; kill it first")
            return self._start(plan, state, node, list(argv))

    def kill(self, node: str) -> bool:
        """SIGKILL ``node``'s process (and its process group); True if it was running."""
        require_root()
        with self.store.locked():
            state, _ = self.load()
            record = self._record(state, node)
            was_alive = kill_process(record, self.kill_timeout_s)
        self._say(f"killed {node} (pid {record.pid})" if was_alive else f"{node} was not running")
        return was_alive

    def restart(self, node: str) -> ProcessRecord:
        """Kill ``node``'s process if it runs, then start the same command again."""
        require_root()
        with self.store.locked():
            state, plan = self.load()
            record = self._record(state, node)
            if kill_process(record, self.kill_timeout_s):
                self._say(f"killed {node} (pid {record.pid})")
            new = self._start(plan, state, node, record.argv)
        self._check_started([new])
        return new

    def _record(self, state: LabState, node: str) -> ProcessRecord:
        record = state.processes.get(node)
        if record is None:
            known = ", ".join(state.processes) or "none (start the lab with --agent-cmd)"
            raise LabLookupError(f"no process recorded for {node!r} (processes: {known})")
        return record

    # --- partitions ------------------------------------------------------------------

    def partition(self, a: str, b: str) -> tuple[str, str]:
        """Drop all traffic between ``a`` and ``b`` (hub, site or host), both ways."""
        require_root()
        with self.store.locked():
            state, plan = self.load()
            pair, rules = plan_partition(plan, a, b)
            if pair in state.partitions:
                self._say(f"{pair[0]} and {pair[1]} are already partitioned")
                return pair
            done = []
            try:
                for rule in rules:
                    self.runner.run(rule.insert_argv())
                    done.append(rule)
            except BaseException:
                for rule in done:
                    self.runner.run(rule.delete_argv(), check=False)
                raise
            state.partitions.append(pair)
            self.store.save(state)
        self._say(f"partitioned {pair[0]} <-/-> {pair[1]} ({len(rules)} rules)")
        return pair

    def heal(self, a: str | None = None, b: str | None = None) -> int:
        """Remove the partition between ``a`` and ``b``, or all of them; rules removed."""
        require_root()
        with self.store.locked():
            state, plan = self.load()
            pair: tuple[str, str] | None = None
            if a is not None or b is not None:
                if a is None or b is None:
                    raise LabPlanError("heal takes two endpoints or none")
                pair, _ = plan_partition(plan, a, b)
            tag = partition_tag(plan.prefix, pair)
            # Found by listing, not from the state: also removes rules whose record is lost.
            removed = 0
            present = set(list_netns(self.runner))
            for node in plan.nodes:
                if node.netns not in present:
                    continue
                rules = iptables_rules(self.runner, node.netns)
                for args in rules_to_delete(rules, tag, prefix=pair is None):
                    self.runner.run(iptables(node.netns, *args))
                    removed += 1
            state.partitions = [p for p in state.partitions if pair is not None and p != pair]
            self.store.save(state)
        what = f"{pair[0]} <-> {pair[1]}" if pair else "all partitions"
        self._say(f"healed {what} ({removed} rules removed)")
        return removed

    # --- running commands in nodes ---------------------------------------------------

    def exec(self, node: str, argv: Sequence[str]) -> int:
        """Run ``argv`` in ``node`` with this process's stdio; its exit code (128+N for a
        signal N, like a shell)."""
        require_root()
        _, plan = self.load()
        netns = plan.node(node).netns
        if not argv:
            raise LabPlanError("exec needs a command")
        try:
            rc = subprocess.call(["ip", "netns", "exec", netns, *argv])
        except FileNotFoundError:
            raise LabPlanError("'ip' not found on PATH") from None
        return 128 - rc if rc < 0 else rc

    def run(
        self, node: str, argv: Sequence[str], *, check: bool = False, timeout_s: float = 60.0
    ) -> CommandResult:
        """Run ``argv`` in ``node``, capturing its output (for scripts and tests)."""
        require_root()
        _, plan = self.load()
        netns = plan.node(node).netns
        return self.runner.run(
            ["ip", "netns", "exec", netns, *argv], check=check, timeout_s=timeout_s
        )

    def interface_bytes(self, node: str, ifname: str) -> tuple[int, int]:
        """(bytes received, bytes sent) by ``ifname`` in ``node`` so far (its counters)."""
        counters = parse_net_dev(self.run(node, ["cat", "/proc/net/dev"], check=True).stdout)
        if ifname not in counters:
            raise LabLookupError(f"no interface {ifname!r} in {node}: {sorted(counters)}")
        return counters[ifname]

    # --- status ----------------------------------------------------------------------

    def status(self) -> LabStatus:
        require_root()
        state, plan = self.load()
        present = set(list_netns(self.runner))
        nodes = tuple(
            NodeStatus(n.name, n.kind, n.netns, n.ip, n.site, n.netns in present)
            for n in plan.nodes
        )
        procs = tuple(
            ProcessStatus(r.node, r.pid, process_alive(r), r.argv, r.log)
            for r in state.processes.values()
        )
        known = set(plan.namespaces)
        stray = tuple(n for n in lab_namespaces_in(self.prefix, sorted(present)) if n not in known)
        return LabStatus(
            prefix=self.prefix,
            phase=state.phase,
            state_path=str(self.store.path),
            wan_subnet=plan.wan_subnet,
            nodes=nodes,
            processes=procs,
            partitions=tuple(state.partitions),
            stray_namespaces=stray,
        )

    # --- teardown --------------------------------------------------------------------

    def down(self, *, keep_logs: bool = False) -> None:
        """Remove everything of this lab: processes, namespaces, links, state.

        Idempotent, and works without a state file (finds namespaces by prefix).
        """
        require_root()
        with self.store.locked():
            self._down(keep_logs=keep_logs)
            self.store.lock_path.unlink(missing_ok=True)

    def _down(self, *, keep_logs: bool) -> None:
        plan: LabPlan | None = None
        records: list[ProcessRecord] = []
        try:
            state, plan = self.load()
            records = list(state.processes.values())
        except LabStateError as exc:
            if self.store.exists():
                log.warning("ignoring unreadable state, cleaning up by prefix: %s", exc)
        existing = lab_namespaces_in(self.prefix, list_netns(self.runner))
        # Recorded processes first: they may sit in a namespace already deleted.
        for record in records:
            if kill_process(record, self.kill_timeout_s):
                self._say(f"killed {record.node} (pid {record.pid})")
        # Then anything else inside the lab's namespaces: a namespace outlives its
        # deletion while a process holds it, and so would its interfaces.
        for netns in existing:
            pids = netns_pids(self.runner, netns)
            if pids:
                self._say(f"killing {len(pids)} process(es) in {netns}")
                stuck = kill_pids(pids, self.kill_timeout_s)
                if stuck:
                    log.warning("processes %s in %s survived SIGKILL", stuck, netns)
        cmds = teardown_commands(plan) if plan is not None else []
        planned = {argv[-1] for argv in cmds}
        cmds = [argv for argv in cmds if argv[-1] in existing]
        cmds += [["ip", "netns", "del", n] for n in existing if n not in planned]
        if cmds:
            self._say(f"deleting {len(cmds)} namespace(s)")
        for argv in cmds:
            result = self.runner.run(argv, check=False)
            if result.returncode != 0:
                log.warning("%s: %s", " ".join(argv), result.stderr.strip())
        # Nothing is created in the root namespace; these could only be debris of an
        # older or foreign build using the same names.
        for link in lab_links_in(self.prefix, list_links(self.runner)):
            self._say(f"deleting stray link {link}")
            self.runner.run(["ip", "link", "del", link], check=False)
        remaining = lab_namespaces_in(self.prefix, list_netns(self.runner))
        if remaining:
            raise LabStateError(f"could not delete namespaces: {', '.join(remaining)}")
        self.store.remove()
        if not keep_logs:
            shutil.rmtree(self.store.lab_dir, ignore_errors=True)
        self._say(f"lab {self.prefix} is down")


def _tail(path: Path, lines: int = 10) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"
