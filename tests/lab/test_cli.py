"""The ``lab`` command line: parsing, help and the root check (no root needed)."""

from __future__ import annotations

import argparse

import pytest

from meshorch.lab.cli import add_lab_commands

SUBCOMMANDS = ["up", "add-host", "kill", "restart", "partition", "heal", "exec", "status", "down"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshorch")
    add_lab_commands(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_has_help(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["lab", sub, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"meshorch lab {sub}" in out and "--prefix" in out


def test_parse_up_and_exec() -> None:
    args = _parser().parse_args(
        ["lab", "up", "--sites", "2", "--hosts", "3", "--prefix", "t1", "--agent-cmd", "x {host}"]
    )
    assert (args.sites, args.hosts, args.prefix, args.agent_cmd) == (2, 3, "t1", "x {host}")
    assert callable(args.handler)
    args = _parser().parse_args(["lab", "exec", "s1-h1", "--", "ip", "-br", "addr"])
    assert args.node == "s1-h1" and args.cmd[-3:] == ["ip", "-br", "addr"]


@pytest.mark.parametrize(
    "argv",
    [
        ["lab", "up", "--sites", "1", "--hosts", "1"],
        ["lab", "status"],
        ["lab", "down"],
        ["lab", "exec", "s1-h1", "--", "true"],
        ["lab", "partition", "s1-h1", "s1-h2"],
    ],
)
def test_non_root_gets_a_clear_error(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    args = _parser().parse_args(argv)
    assert args.handler(args) == 1
    assert "the lab needs root: it creates network namespaces" in capsys.readouterr().err


def test_bad_prefix_is_an_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["lab", "status", "--prefix", "Bad-Prefix"])
    assert args.handler(args) == 1
    assert "bad lab prefix" in capsys.readouterr().err


def test_exec_takes_options_given_after_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, str, list[str]]] = []

    class FakeLab:
        def __init__(self, prefix: str, state_dir: object, **_: object) -> None:
            self.prefix = prefix

        def exec(self, node: str, argv: list[str]) -> int:
            seen.append((self.prefix, node, argv))
            return 3

    monkeypatch.setattr("meshorch.lab.cli.Lab", FakeLab)
    args = _parser().parse_args(["lab", "exec", "s1-h1", "--prefix", "t1", "--", "ls", "--", "-l"])
    assert args.handler(args) == 3
    assert seen == [("t1", "s1-h1", ["ls", "--", "-l"])]
