import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson

from meshorch.cli.main import build_parser, command_word

MESHORCH = [sys.executable, "-m", "meshorch"]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MESHORCH, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("agent", "demo", "hub", "deploy", "sites", "apps"):
        assert command in result.stdout
    hub_help = run("hub", "--help")
    assert hub_help.returncode == 0 and hub_help.stdout.startswith("usage: meshorch hub")
    assert "--data-dir" in hub_help.stdout
    deploy_help = run("deploy", "--help")
    assert deploy_help.returncode == 0 and "placement:" in deploy_help.stdout
    agent_help = run("agent", "--help")
    assert agent_help.returncode == 0 and "--peer" in agent_help.stdout
    assert "examples:" in agent_help.stdout


def command_paths(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every command and subcommand of ``parser``, as the words that name it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from command_paths(sub, (*prefix, name))


def test_every_command_has_its_help() -> None:
    """Each command's module is imported only when it runs: each --help in a process of its
    own imports what that command needs, and nothing else has loaded it before."""
    paths = list(command_paths(build_parser()))
    assert ("agent",) in paths and ("app", "apply") in paths and ("chaos", "run") in paths
    processes = {
        path: subprocess.Popen(
            [*MESHORCH, *path, "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for path in paths
    }
    failed = {}
    for path, process in processes.items():
        out, err = process.communicate(timeout=120)
        if process.returncode != 0 or not out.startswith(f"usage: meshorch {' '.join(path)}"):
            failed[" ".join(path)] = (process.returncode, err[-500:] or out[:200])
    assert failed == {}


def test_the_command_word_skips_the_global_options() -> None:
    assert command_word(["--log-level", "debug", "agent", "--site", "s"]) == "agent"
    assert command_word(["--log-level=debug", "app", "list"]) == "app"
    assert command_word(["--help"]) is None
    # The agent's parser knows only the agent command; any other word gets them all.
    assert set(command_paths(build_parser("agent"))) == {("agent",)}
    assert ("host", "drain") in set(command_paths(build_parser("host")))


def test_agent_lists_every_configuration_problem(tmp_path: Path) -> None:
    result = run(
        "agent", "--site", "Shop_1", "--host-id=-h1", "--data-dir", str(tmp_path),
        "--api", "nowhere", "--raft", "127.0.0.1:99999",
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for fragment in ("'Shop_1'", "'-h1'", "--api", "--raft"):
        assert fragment in result.stderr


def test_agent_with_peers_needs_a_cluster_password(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    result = run(
        "agent", "--site", "s", "--host-id", "h1", "--data-dir", str(tmp_path / "d"),
        "--api", "127.0.0.1:1", "--raft", "127.0.0.1:2", "--peer", "127.0.0.1:3", env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert "cluster password is required" in result.stderr


def test_agent_refuses_a_data_dir_of_another_site(tmp_path: Path) -> None:
    (tmp_path / "agent.json").write_bytes(
        orjson.dumps({"site": "other", "host_id": "h1", "raft": "127.0.0.1:2"})
    )
    (tmp_path / "cluster.password").write_text("p" * 32)
    result = run(
        "agent", "--site", "mine", "--host-id", "h1", "--data-dir", str(tmp_path),
        "--api", "127.0.0.1:1", "--raft", "127.0.0.1:2",
    )  # fmt: skip
    assert result.returncode == 2
    assert "belongs to site='other'" in result.stderr


def test_demo_runs_a_hub_and_three_sites_and_cleans_up() -> None:
    result = run("demo", "--exit-after", "0.5", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fleet root key" in result.stdout
    waves = r"waves \[\['shop-ap'\], \['shop-eu'\], \['shop-us'\]\]"
    assert re.search(rf"deployment dep-\d+, {waves}", result.stdout), result.stdout
    assert re.search(r"Dashboard: https://127\.0\.0\.1:\d+/ ", result.stdout)
    assert "deployment succeeded" in result.stdout
    # The app writes to stdout: its lines reach the hub (the dashboard's "Recent logs").
    assert re.search(r"shop-\w+ +h\d +clock tick \d+: ", result.stdout), result.stdout
    lines = result.stdout.splitlines()
    for site in ("shop-eu", "shop-us", "shop-ap"):
        running = [
            line for line in lines
            if re.match(rf"\s+{site}\s+hello\.\S+ +on h\d .*running\s+ready$", line)
        ]  # fmt: skip
        assert len(running) == 3, result.stdout
        assert re.search(rf"\s+{site}\s+healthy\s+applied delta \d+", result.stdout)
    data_dir = re.search(r"data under (\S+)\)", result.stdout)
    assert data_dir is not None and not Path(data_dir.group(1)).exists()
