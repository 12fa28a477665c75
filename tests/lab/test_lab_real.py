"""The lab for real: namespaces, bridges, NAT, partitions, processes (root).

Every test drives the CLI in subprocesses (as separate invocations, like a user) with
a random prefix and its own state dir, and tears the lab down even on failure.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from meshorch.lab.plan import is_lab_link, is_lab_netns
from meshorch.lab.system import pid_alive
from tests.labutil import require_lab

pytestmark = pytest.mark.lab

CLI_TIMEOUT_S = 180.0  # two busy cores: be generous


class LabCli:
    """``python -m meshorch.lab`` bound to one prefix and state dir."""

    def __init__(self, prefix: str, state_dir: Path) -> None:
        self.prefix = prefix
        self.state_dir = state_dir
        self.env = {
            **os.environ,
            "MESHORCH_LAB_STATE_DIR": str(state_dir),
            "MESHORCH_LAB_PREFIX": prefix,
        }

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "meshorch.lab", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"lab {' '.join(args)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def ping(self, node: str, address: str, *, count: int = 3) -> bool:
        proc = self(
            "exec", node, "--", sys.executable, "-m", "meshorch.lab.probe",
            "ping", "--count", str(count), "--timeout-s", "1", address,
            check=False,
        )  # fmt: skip
        return proc.returncode == 0

    def status(self) -> dict[str, Any]:
        doc = orjson.loads(self("status", "--json").stdout)
        assert isinstance(doc, dict)
        return doc

    def pids(self) -> dict[str, int]:
        return {p["node"]: p["pid"] for p in self.status()["processes"]}


def _netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _lab_namespaces(prefix: str) -> list[str]:
    return [n for n in _netns_list() if is_lab_netns(prefix, n)]


def _force_cleanup(prefix: str) -> None:
    """Last resort if `lab down` itself is broken: never leave debris on the machine."""
    for netns in _lab_namespaces(prefix):
        pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
        for pid in pids.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", netns], check=False)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LabCli]:
    require_lab("iptables")
    cli = LabCli(f"t{secrets.token_hex(2)[:3]}", tmp_path / "state")
    try:
        yield cli
    finally:
        try:
            cli("down", check=False)
        finally:
            _force_cleanup(cli.prefix)


def _assert_gone(prefix: str, pids: list[int]) -> None:
    assert _lab_namespaces(prefix) == []
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert not [w for w in links.split() if is_lab_link(prefix, w.rstrip(":").split("@")[0])]
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    assert f"meshorch-lab:{prefix}" not in rules
    assert [p for p in pids if pid_alive(p)] == []


def _mcast_listener(lab: LabCli, node: str, ip: str) -> subprocess.Popen[str]:
    argv = ["ip", "netns", "exec", f"{lab.prefix}-{node}", sys.executable, "-m"]
    argv += ["meshorch.lab.probe", "mcast-recv", "--iface", ip, "--timeout-s", "15"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def test_up_connectivity_nat_and_multicast(lab: LabCli) -> None:
    require_lab("iptables")
    up = lab("up", "--sites", "2", "--hosts", "2")
    assert "is up" in up.stderr
    # A host reaches its site-mate and the hub (through its site's NAT).
    assert lab.ping("s1-h1", "10.1.0.12")
    assert lab.ping("s1-h1", "172.30.0.2")
    assert lab.ping("s2-h2", "172.30.0.2")
    # The hub cannot reach into a site: no route, and even with one the NAT fence holds.
    assert not lab.ping("hub", "10.1.0.11", count=1)
    lab("exec", "hub", "--", "ip", "route", "add", "10.1.0.0/24", "via", "172.30.0.11")
    assert not lab.ping("hub", "10.1.0.11", count=1)
    assert lab.ping("hub", "172.30.0.11")  # the site's public address answers
    # Nor can another site's host.
    assert not lab.ping("s2-h1", "10.1.0.11", count=1)

    # Multicast (mDNS's group and port) crosses the site bridge, and stays in the site.
    probe = [sys.executable, "-m", "meshorch.lab.probe"]
    listeners = {
        node: _mcast_listener(lab, node, ip)
        for node, ip in (("s1-h1", "10.1.0.11"), ("s2-h1", "10.2.0.11"))
    }
    try:
        for proc in listeners.values():
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        lab("exec", "s1-h2", "--", *probe, "mcast-send", "--iface", "10.1.0.12", "hello",
            "--repeat", "10", "--interval-s", "0.1")  # fmt: skip
        out, _ = listeners["s1-h1"].communicate(timeout=30)
        assert "from 10.1.0.12: hello" in out
        out, _ = listeners["s2-h1"].communicate(timeout=30)
        assert "timeout" in out
    finally:
        for proc in listeners.values():
            proc.kill()
            proc.wait()

    text = lab("status").stdout
    for name in ("hub", "s1-r", "s1-h1", "s2-h2", "10.2.0.12", "partitions: none"):
        assert name in text


def test_partition_and_heal(lab: LabCli) -> None:
    require_lab("iptables")
    lab("up", "--sites", "2", "--hosts", "2")
    assert lab.ping("s1-h1", "10.1.0.12")
    lab("partition", "s1-h1", "s1-h2")
    assert not lab.ping("s1-h1", "10.1.0.12", count=2)
    assert not lab.ping("s1-h2", "10.1.0.11", count=2)
    assert lab.ping("s1-h1", "172.30.0.2")  # only that pair is cut
    assert lab.status()["partitions"] == [["s1-h1", "s1-h2"]]

    lab("partition", "s2", "hub")
    assert not lab.ping("s2-h1", "172.30.0.2", count=2)
    assert lab.ping("s1-h1", "172.30.0.2")

    lab("heal", "s2", "hub")
    assert lab.ping("s2-h1", "172.30.0.2")
    assert not lab.ping("s1-h1", "10.1.0.12", count=1)

    healed = lab("heal")
    assert "rules removed" in healed.stderr
    assert lab.ping("s1-h1", "10.1.0.12")
    assert lab.ping("s1-h2", "10.1.0.11")
    assert lab.status()["partitions"] == []
    for node in ("s1-h1", "s1-h2", "s2-r", "hub"):
        rules = lab("exec", node, "--", "iptables", "-S").stdout
        assert ":part:" not in rules


def test_add_host_exec_kill_restart(lab: LabCli) -> None:
    require_lab("iptables")
    template = (
        "sh -c 'echo agent {host} {site} {lan_ip} {netns} {data_dir} hub={hub_ip}; exec sleep 1000'"
    )
    lab("up", "--sites", "1", "--hosts", "1", "--agent-cmd", template)
    log = lab.state_dir / lab.prefix / "logs" / "s1-h1.log"
    data_dir = lab.state_dir / lab.prefix / "data" / "s1-h1"
    expected = f"agent s1-h1 s1 10.1.0.11 {lab.prefix}-s1-h1 {data_dir} hub=172.30.0.2"
    assert log.read_text().splitlines().count(expected) == 1
    assert data_dir.is_dir()

    added = lab("add-host", "s1")
    assert added.stdout.strip() == "s1-h2"
    pids = lab.pids()
    assert set(pids) == {"s1-h1", "s1-h2"} and all(pid_alive(p) for p in pids.values())
    assert lab.ping("s1-h2", "10.1.0.11")
    assert lab.ping("s1-h2", "172.30.0.2")

    # exec runs inside the host's namespace and passes the exit code through.
    addr = lab("exec", "s1-h2", "--", "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert "10.1.0.12/24" in addr
    assert lab("exec", "s1-h2", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    assert lab("exec", "s1-h9", "--", "true", check=False).returncode == 1

    # The started process runs in that namespace.
    in_ns = subprocess.run(
        ["ip", "netns", "pids", f"{lab.prefix}-s1-h1"], capture_output=True, text=True
    ).stdout.split()
    assert str(pids["s1-h1"]) in in_ns

    lab("kill", "s1-h1")
    assert not pid_alive(pids["s1-h1"])
    assert [p["alive"] for p in lab.status()["processes"] if p["node"] == "s1-h1"] == [False]
    assert "DEAD" in lab("status").stdout
    assert pid_alive(pids["s1-h2"])

    lab("restart", "s1-h1")
    new_pid = lab.pids()["s1-h1"]
    assert new_pid != pids["s1-h1"] and pid_alive(new_pid)
    assert log.read_text().splitlines().count(expected) == 2
    lab("restart", "s1-h2")  # restart of a live process kills it first
    assert not pid_alive(pids["s1-h2"]) and pid_alive(lab.pids()["s1-h2"])

    down = lab("down")
    assert "is down" in down.stderr
    _assert_gone(lab.prefix, [new_pid, *pids.values()])


def test_down_removes_everything_and_up_works_again(lab: LabCli) -> None:
    require_lab("iptables")
    lab("up", "--sites", "2", "--hosts", "2", "--agent-cmd", "sleep 1000", "--hub-cmd", "sleep 999")
    pids = list(lab.pids().values())
    assert len(pids) == 5
    hub_pid = lab.pids()["hub"]
    lab("restart", "hub")
    assert not pid_alive(hub_pid) and pid_alive(lab.pids()["hub"])
    pids = list(lab.pids().values())
    lab("partition", "s1", "s2")
    lab("down")
    _assert_gone(lab.prefix, pids)
    assert not (lab.state_dir / f"{lab.prefix}.json").exists()
    assert lab("down").returncode == 0  # idempotent
    lab("up", "--sites", "1", "--hosts", "1")
    assert lab.ping("s1-h1", "172.30.0.2")


def test_down_after_the_state_file_is_lost(lab: LabCli) -> None:
    require_lab("iptables")
    lab("up", "--sites", "2", "--hosts", "1", "--agent-cmd", "sleep 1000")
    pids = list(lab.pids().values())
    (lab.state_dir / f"{lab.prefix}.json").unlink()
    refused = lab("up", "--sites", "1", "--hosts", "1", check=False)
    assert refused.returncode == 1 and "leftovers" in refused.stderr
    assert lab("status", check=False).returncode == 1
    lab("down")
    # The processes were found through `ip netns pids`, not through the lost records.
    _assert_gone(lab.prefix, pids)


@pytest.mark.parametrize("crash_at", [7, 45])
def test_down_after_a_crashed_up(lab: LabCli, crash_at: int) -> None:
    require_lab("iptables")
    # `up` SIGKILLed midway (no chance to roll back): by its own runner, deterministically.
    code = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from meshorch.lab import Lab
        from meshorch.lab.system import SubprocessRunner

        class Crashing(SubprocessRunner):
            calls = 0
            def run(self, argv, **kwargs):
                Crashing.calls += 1
                if Crashing.calls == {crash_at}:
                    os.kill(os.getpid(), signal.SIGKILL)
                return super().run(argv, **kwargs)

        Lab({lab.prefix!r}, Path({str(lab.state_dir)!r}), runner=Crashing()).up(2, 2)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=CLI_TIMEOUT_S, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert _lab_namespaces(lab.prefix), "the crash should leave a half-built lab"
    assert lab.status()["phase"] == "building"
    # Something running inside the debris must go too.
    netns = _lab_namespaces(lab.prefix)[0]
    sleeper = subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "1000"])
    try:
        deadline = time.monotonic() + 30
        while (
            str(sleeper.pid)
            not in subprocess.run(
                ["ip", "netns", "pids", netns], capture_output=True, text=True
            ).stdout.split()
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        lab("down")
        assert sleeper.wait(timeout=30) == -signal.SIGKILL
    finally:
        sleeper.kill()
        sleeper.wait()
    _assert_gone(lab.prefix, [])


def test_bad_agent_command_builds_nothing(lab: LabCli) -> None:
    require_lab("iptables")
    proc = lab("up", "--sites", "1", "--hosts", "1", "--agent-cmd", "sleep {nope}", check=False)
    assert proc.returncode == 1 and "unknown placeholder {nope}" in proc.stderr
    assert _lab_namespaces(lab.prefix) == []
