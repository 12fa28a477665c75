"""``Lab`` against a simulated system: the orchestration logic without root."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

import pytest

from meshorch.lab import Lab, LabCommandError, LabStateError, plan_commands, plan_lab
from meshorch.lab.system import CommandResult


class FakeSystem:
    """Just enough of ``ip netns`` and ``iptables`` (filter table) to drive ``Lab``."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.netns: set[str] = set()
        self.rules: dict[str, list[list[str]]] = {}
        self.calls: list[list[str]] = []
        self.fail_at = fail_at

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout_s: float | None = None
    ) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            return self._done(argv, 2, "", "RTNETLINK answers: boom", check)
        return self._dispatch(argv, check)

    def _done(self, argv: list[str], rc: int, out: str, err: str, check: bool) -> CommandResult:
        if check and rc:
            raise LabCommandError(argv, rc, err)
        return CommandResult(tuple(argv), rc, out, err)

    def _dispatch(self, argv: list[str], check: bool) -> CommandResult:
        ok = self._done(argv, 0, "", "", check)
        if argv == ["ip", "netns", "list"]:
            return self._done(argv, 0, "\n".join(sorted(self.netns)), "", check)
        if argv == ["ip", "-o", "link", "show"]:
            return self._done(argv, 0, "1: lo: <LOOPBACK,UP> mtu 65536\n", "", check)
        if argv[:3] == ["ip", "netns", "add"]:
            if argv[3] in self.netns:
                return self._done(argv, 1, "", "File exists", check)
            self.netns.add(argv[3])
            return ok
        if argv[:3] == ["ip", "netns", "del"]:
            if argv[3] not in self.netns:
                return self._done(argv, 1, "", "No such file or directory", check)
            self.netns.discard(argv[3])
            self.rules.pop(argv[3], None)
            return ok
        if argv[:3] == ["ip", "netns", "pids"]:
            return ok
        netns = argv[2] if argv[:2] == ["ip", "-n"] else argv[3]
        if netns not in self.netns:
            return self._done(argv, 1, "", f'Cannot open network namespace "{netns}"', check)
        if argv[4:6] == ["iptables", "-w"]:
            return self._iptables(argv, netns, argv[6:], check)
        return ok

    def _iptables(self, argv: list[str], netns: str, args: list[str], check: bool) -> CommandResult:
        rules = self.rules.setdefault(netns, [])
        if args[:2] == ["-t", "nat"]:
            return self._done(argv, 0, "", "", check)
        if args[:2] == ["-t", "filter"]:
            args = args[2:]
        if args == ["-S"]:
            out = "\n".join(shlex.join(["-A", *r]) for r in rules)
            return self._done(argv, 0, out, "", check)
        op, rule = args[0], args[1:]
        if op == "-I":
            rules.insert(0, rule)
        elif op == "-A":
            rules.append(rule)
        elif op == "-D":
            if rule not in rules:
                return self._done(argv, 1, "", "Bad rule", check)
            rules.remove(rule)
        return self._done(argv, 0, "", "", check)

    def partition_rules(self) -> list[list[str]]:
        return [r for rs in self.rules.values() for r in rs if ":part:" in " ".join(r)]


@pytest.fixture(autouse=True)
def _pretend_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("meshorch.lab.lab.require_root", lambda: None)


def _lab(tmp_path: Path, system: FakeSystem, prefix: str = "mo") -> Lab:
    return Lab(prefix, tmp_path, runner=system)


def test_up_runs_the_plan_and_records_state(tmp_path: Path) -> None:
    system = FakeSystem()
    messages: list[str] = []
    lab = Lab("mo", tmp_path, runner=system, progress=messages.append)
    plan = lab.up(2, 2)
    built = [c for c in system.calls if c not in (["ip", "netns", "list"],)]
    assert built == plan_commands(plan_lab(2, 2, "mo"))
    assert system.netns == set(plan.namespaces)
    state, loaded = lab.load()
    assert state.phase == "up" and loaded == plan
    assert any("site s2" in m for m in messages)
    status = lab.status()
    assert all(n.present for n in status.nodes)
    assert status.processes == () and status.partitions == ()


def test_up_refuses_an_existing_lab_or_its_leftovers(tmp_path: Path) -> None:
    system = FakeSystem()
    lab = _lab(tmp_path, system)
    lab.up(1, 1)
    with pytest.raises(LabStateError, match="already exists"):
        lab.up(1, 1)
    lab.store.remove()  # as if the state file were lost
    with pytest.raises(LabStateError, match="leftovers"):
        lab.up(1, 1)


@pytest.mark.parametrize("fail_at", [2, 15, 40])
def test_failed_up_tears_down_what_it_built(tmp_path: Path, fail_at: int) -> None:
    system = FakeSystem(fail_at=fail_at)
    lab = _lab(tmp_path, system)
    with pytest.raises(LabCommandError, match="boom"):
        lab.up(2, 2)
    assert system.netns == set()
    assert not lab.exists()


def test_down_without_state_finds_namespaces_by_prefix(tmp_path: Path) -> None:
    system = FakeSystem()
    lab = _lab(tmp_path, system)
    lab.up(2, 1)
    system.netns.update({"mox-s1-h1", "other", "mo-s7-h3"})  # another lab, a stranger, debris
    lab.store.remove()
    lab.down()
    assert system.netns == {"mox-s1-h1", "other"}
    lab.down()  # idempotent


def test_partition_and_heal(tmp_path: Path) -> None:
    system = FakeSystem()
    lab = _lab(tmp_path, system)
    lab.up(2, 2)
    assert lab.partition("s1-h1", "s1-h2") == ("s1-h1", "s1-h2")
    assert len(system.partition_rules()) == 4
    lab.partition("s1-h2", "s1-h1")  # already there: no duplicate rules
    assert len(system.partition_rules()) == 4
    lab.partition("s1", "hub")
    assert lab.load()[0].partitions == [("s1-h1", "s1-h2"), ("hub", "s1")]
    assert lab.heal("s1-h1", "s1-h2") == 4
    assert lab.load()[0].partitions == [("hub", "s1")]
    assert lab.heal() > 0
    assert system.partition_rules() == []
    assert lab.load()[0].partitions == []
    # The lab's own NAT fence survives healing.
    assert any("DROP" in r for r in system.rules["mo-s1-r"])


def test_add_host_rolls_back_on_failure(tmp_path: Path) -> None:
    system = FakeSystem()
    lab = _lab(tmp_path, system)
    lab.up(1, 1)
    system.fail_at = len(system.calls) + 3
    with pytest.raises(LabCommandError):
        lab.add_host("s1")
    assert "mo-s1-h2" not in system.netns
    assert lab.load()[0].site_hosts == [1]
    system.fail_at = None
    host = lab.add_host("s1")
    assert host.name == "s1-h2" and "mo-s1-h2" in system.netns
    assert lab.load()[0].site_hosts == [2]


def test_unknown_template_fails_before_building(tmp_path: Path) -> None:
    system = FakeSystem()
    lab = _lab(tmp_path, system)
    with pytest.raises(Exception, match="unknown placeholder"):
        lab.up(1, 1, agent_cmd="sleep {nope}")
    with pytest.raises(Exception, match="not found"):
        lab.up(1, 1, agent_cmd="no-such-binary-xyz {host}")
    assert system.netns == set() and not lab.exists()


def test_lab_demo_names_what_is_missing() -> None:
    from meshorch.lab.prerequisites import LAB_TOOLS, missing_prerequisites

    assert missing_prerequisites(0, lambda tool: f"/usr/bin/{tool}") == []
    missing = missing_prerequisites(1000, lambda tool: None if tool == "podman" else tool)
    assert missing == ["it needs root (network namespaces, WireGuard, podman)",
                       "'podman' is not installed"]  # fmt: skip
    assert len(missing_prerequisites(0, lambda tool: None)) == len(LAB_TOOLS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:7980", ("127.0.0.1", 7980)), ("0.0.0.0:0", ("0.0.0.0", 0)),
     ("[::1]:80", ("::1", 80))],
)  # fmt: skip
def test_lab_demo_dashboard_address(text: str, expected: tuple[str, int]) -> None:
    from meshorch.demo.lab import parse_listen

    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", "7980", "host:", ":80", "host:http", "host:70000"])
def test_lab_demo_refuses_bad_dashboard_addresses(text: str) -> None:
    from meshorch.demo.lab import parse_listen

    with pytest.raises(ValueError, match="expected HOST:PORT"):
        parse_listen(text)
