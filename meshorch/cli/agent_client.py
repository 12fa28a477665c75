"""Calls to an agent's API for the command line (one request, JSON both ways).

An agent is reached on this host through its root-only socket (a path: the default, from
``$MESHORCH_AGENT`` or ``/var/lib/meshorch/agent.sock``), or over TCP (``HOST:PORT``) with an
access token from ``$MESHORCH_AGENT_TOKEN`` (``meshorch access-token create``).
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from meshorch.errors import ConfigurationError

AGENT_ENV = "MESHORCH_AGENT"
TOKEN_ENV = "MESHORCH_AGENT_TOKEN"
DEFAULT_SOCKET = "/var/lib/meshorch/agent.sock"
AGENT_HELP = (
    f"the agent: its socket (default ${AGENT_ENV}, else {DEFAULT_SOCKET}) or HOST:PORT "
    f"(then with the access token in ${TOKEN_ENV})"
)


class _DeprecatedFlag(argparse.Action):
    """A flag kept for old scripts: works as the one it stands for, and says so."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        print(f"meshorch: {option_string} is deprecated: use --agent", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_agent_flag(parser: argparse.ArgumentParser, dest: str = "agent") -> None:
    """``--agent``: the address of the agent a command talks to (``--api``: its old name
    on some commands, still taken, with a deprecation notice)."""
    parser.add_argument("--agent", dest=dest, default=None, help=AGENT_HELP)
    parser.add_argument("--api", dest=dest, action=_DeprecatedFlag, help=argparse.SUPPRESS)


def add_output_flag(parser: argparse.ArgumentParser) -> None:
    """``--output table|json`` of a listing."""
    parser.add_argument(
        "-o", "--output", choices=("table", "json"), default="table",
        help="table for people (default) or json: the listing as one JSON array",
    )  # fmt: skip


def print_json(items: object) -> None:
    sys.stdout.write(orjson.dumps(items, option=orjson.OPT_INDENT_2).decode() + "\n")


class AgentRefused(ConfigurationError):
    """The agent answered with an error; ``code`` and ``detail`` are its own."""

    def __init__(self, agent: str, status: int, code: str, detail: str) -> None:
        super().__init__(f"the agent at {agent} refused: {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail


def default_agent() -> str:
    return os.environ.get(AGENT_ENV) or DEFAULT_SOCKET


def is_socket(agent: str) -> bool:
    return agent.startswith(("/", "./", "unix:"))


def agent_address(agent: str | None) -> str:
    """``--agent``/``--api`` as given (``http://`` and a trailing slash dropped), or the
    default."""
    text = agent or default_agent()
    return text.removeprefix("http://").rstrip("/") if not is_socket(text) else text


def auth_headers(agent: str) -> dict[str, str]:
    """The access token for TCP; nothing on the socket (its mode is the credential)."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    return {"Authorization": f"Bearer {token}"} if token and not is_socket(agent) else {}


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


def _connection(agent: str, timeout: float) -> http.client.HTTPConnection:
    if is_socket(agent):
        return _UnixConnection(agent.removeprefix("unix:"), timeout)
    host, _, port = agent.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigurationError(f"{agent!r}: give the agent's socket path or HOST:PORT")
    return http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)


def request_agent(
    agent: str,
    method: str,
    path: str,
    data: bytes | None = None,
    content_type: str = "application/json",
    timeout: float = 30.0,
) -> dict[str, Any]:
    """One request; errors become ConfigurationError (AgentRefused with the agent's code)."""
    headers = {**auth_headers(agent)}
    if data is not None:
        headers["Content-Type"] = content_type
    connection = _connection(agent, timeout)
    try:
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ConfigurationError(f"cannot reach the agent at {agent}: {exc}") from exc
    finally:
        connection.close()
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        body = {}
    if response.status >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        code = str(error.get("code", response.status))
        detail = str(error.get("message", response.reason))
        raise AgentRefused(agent, response.status, code, detail)
    return dict(body) if isinstance(body, dict) else {}


def call_agent(agent: str, method: str, path: str, body: object | None = None) -> dict[str, Any]:
    """``agent`` is a socket path or HOST:PORT; ``body`` is sent as JSON."""
    data = orjson.dumps(body) if body is not None else None
    return request_agent(agent, method, path, data)
