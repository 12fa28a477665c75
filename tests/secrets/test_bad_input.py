"""Bad input on every secrets route and operation: a clear error, and the secrets table
unchanged. Then the `meshorch site` commands against the same agent.

One agent runs in the test's event loop, so the test can compare its Raft table
directly; its deltas come by relay."""

from __future__ import annotations

import asyncio
import base64
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox

from meshorch.apps.settings import WorkloadSettings
from meshorch.secrets.keyring import hostkey_key
from meshorch.site.agent import Agent
from meshorch.state.tables import SECRETS_TABLE
from tests.agent_token import HEADERS
from tests.agents_util import lone_agent_config, peer_headers
from tests.fleet.hubstub import StubHub
from tests.secrets.helpers import ROOT, until

SITE = "lone-site"
PEER_ROUTES = {
    "/v1/secrets/unseal-request",
    "/v1/secrets/rekey",
}  # the other hosts call these, not operators


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    config = lone_agent_config(tmp_path, SITE, "acme", ROOT)
    async with Agent(config, None, WorkloadSettings(runtime="process")) as running:
        yield running


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def table(agent: Agent) -> dict[bytes, bytes]:
    records, _ = agent.raft.view.scan(SECRETS_TABLE, b"", 100_000)
    return {key: record.value for key, record in records}


BAD: list[tuple[str, str, bytes, int, str]] = [
    ("POST", "/v1/secrets/unseal-request", b"not json", 400, "bad_json"),
    ("POST", "/v1/secrets/unseal-request", b"[]", 400, "bad_request"),
    ("POST", "/v1/secrets/unseal-request", b'{"host_id": 5}', 400, "bad_request"),
    ("POST", "/v1/secrets/unseal-request", b'{"host_id": "Bad_Host"}', 400, "bad_host_id"),
    # Signed by h1: a host asks for its own unseal key only.
    ("POST", "/v1/secrets/unseal-request", b'{"host_id": "h9"}', 403, "not_the_requester"),
    ("POST", "/v1/secrets/unseal-request", b'{"host_id": "h1", "x": 1}', 400, "bad_request"),
    (
        "POST",
        "/v1/secrets/unseal-request",
        b'{"host_id": "' + b"a" * 5000 + b'"}',
        413,
        "too_large",
    ),
    ("POST", "/v1/secrets/rekey", b"{}", 400, "bad_public_key"),
    ("POST", "/v1/secrets/rekey", b'{"ssk_public": "ab"}', 400, "bad_public_key"),
    (
        "POST",
        "/v1/secrets/rekey",
        orjson.dumps({"ssk_public": "ab" * 32, "sealed_key": "!!"}),
        400,
        "bad_base64",
    ),
    (
        "POST",
        "/v1/secrets/rekey",
        orjson.dumps({"ssk_public": "ab" * 32, "x": 1}),
        400,
        "bad_request",
    ),
    # Not sealed to this host's key: refused, nothing kept.
    (
        "POST",
        "/v1/secrets/rekey",
        orjson.dumps({"ssk_public": "ab" * 32, "sealed_key": b64(b"x" * 80)}),
        403,
        "wrong_key",
    ),
    ("POST", "/v1/secrets/unseal", b"{}", 400, "bad_base64"),
    ("POST", "/v1/secrets/unseal", b'{"key": "!!"}', 400, "bad_base64"),
    ("POST", "/v1/secrets/unseal", b'{"key": 32}', 400, "bad_base64"),
    ("POST", "/v1/secrets/unseal", orjson.dumps({"key": b64(b"k" * 16)}), 400, "bad_key"),
    ("POST", "/v1/secrets/unseal", orjson.dumps({"key": b64(b"k" * 32)}), 403, "wrong_key"),
    (
        "POST",
        "/v1/secrets/unseal",
        orjson.dumps({"key": b64(b"k" * 32), "x": 1}),
        400,
        "bad_request",
    ),
    ("POST", "/v1/secrets/escrow", b"{}", 400, "bad_public_key"),
    ("POST", "/v1/secrets/escrow", b'{"public_key": "zz"}', 400, "bad_public_key"),
    (
        "POST",
        "/v1/secrets/escrow",
        orjson.dumps({"public_key": "g" * 64}),
        400,
        "bad_public_key",
    ),
    ("POST", "/v1/secrets/lockdown", b'{"now": true}', 400, "bad_request"),
    ("POST", "/v1/secrets/lockdown", b"nope", 400, "bad_json"),
    ("POST", "/v1/secrets/unlock", b'{"x": 1}', 400, "bad_request"),
    ("POST", "/v1/secrets/rotate", b'{"wait_s": -1}', 400, "bad_request"),
    ("POST", "/v1/secrets/rotate", b'{"wait_s": "1"}', 400, "bad_request"),
    ("POST", "/v1/secrets/rotate", b'{"wait_s": true}', 400, "bad_request"),
    ("POST", "/v1/secrets/rotate", b'{"key": 1}', 400, "bad_request"),
    ("PUT", "/v1/secrets/settings", b"{}", 400, "bad_settings"),
    ("PUT", "/v1/secrets/settings", b'{"rotation_interval_s": 0}', 400, "bad_settings"),
    ("PUT", "/v1/secrets/settings", b'{"rotation_interval_s": "1h"}', 400, "bad_settings"),
    ("PUT", "/v1/secrets/settings", b'{"rotation_interval_s": 1e99}', 400, "bad_settings"),
    (
        "PUT",
        "/v1/secrets/settings",
        b'{"rotation_interval_s": 60, "x": 1}',
        400,
        "bad_request",
    ),
    ("GET", "/v1/secrets?consistency=maybe", b"", 400, "bad_consistency"),
]

BAD_OPS: list[tuple[dict[str, Any], str]] = [
    ({"op": "secret.put", "tenant": "default", "name": "db", "version": 1}, "missing fields"),
    (
        {
            "op": "secret.put",
            "tenant": "default",
            "name": "db",
            "version": 1,
            "sealed": {SITE: "!!"},
        },
        "not valid base64",
    ),
    (
        {
            "op": "secret.put",
            "tenant": "default",
            "name": "db",
            "version": 1,
            "sealed": {"elsewhere": b64(b"x" * 64)},
        },
        "no value for site",
    ),
    ({"op": "secret.delete", "name": "db"}, "missing fields"),
    ({"op": "site.lockdown", "reason": "x"}, "unknown fields"),
    ({"op": "site.unlock", "force": True}, "unknown fields"),
    ({"op": "secrets.rotate", "now": 1}, "unknown fields"),
    ({"op": "secrets.nope"}, "unknown operation"),
]


async def test_bad_input_changes_nothing(agent: Agent, tmp_path: Path) -> None:
    base = f"http://{agent.config.api_address}"
    timeout = aiohttp.ClientTimeout(total=20)
    async with (
        aiohttp.ClientSession(timeout=timeout, headers=HEADERS) as session,
        aiohttp.ClientSession(timeout=timeout) as peer,
    ):

        async def call(method: str, path: str, body: bytes = b"") -> tuple[int, dict[str, Any]]:
            if path in PEER_ROUTES:  # signed by the host, as its peers sign theirs
                config = agent.config
                signed = peer_headers(config.data_dir, config.host_id, method, path)
                request = peer.request(method, base + path, data=body, headers=signed)
            else:
                request = session.request(method, base + path, data=body)
            async with request as response:
                return response.status, dict(await response.json(content_type=None))

        async def unsealed() -> bool:
            status, body = await call("GET", "/v1/secrets/status")
            return status == 200 and not body["sealed"] and body["secrets"] == 0

        async def configured() -> bool:
            status, body = await call("GET", "/v1/fleet")
            return status == 200 and body["trust"] is not None

        await until("the lone host created the site's keys", unsealed)
        # The host registers its own key (a Raft write to the secrets table) in a later tick
        # than the one that created the site's keys: before it, an unseal request for it is
        # 404 no_host_key, and the table below would change under the test (seen in CI).
        host_key_record = hostkey_key(agent.config.host_id)
        await until(
            "the host registered its key",
            lambda: agent.raft.view.get(SECRETS_TABLE, host_key_record) is not None,
        )
        await until("the fleet link is configured", configured)
        before = table(agent)
        for method, path, body, status, code in BAD:
            got, answer = await call(method, path, body)
            assert (got, answer["error"]["code"]) == (status, code), (path, body[:60], answer)
            assert answer["error"]["message"]
        assert table(agent) == before

        # Bad operations in a verified delta: skipped and reported, nothing written.
        signer = StubHub("acme", ROOT)
        signer.publish([op for op, _ in BAD_OPS])
        got, answer = await call("POST", "/v1/fleet/deltas", signer.envelopes[-1])
        assert got == 200 and answer["applied"] == [1], answer
        errors = answer["op_errors"]
        assert len(errors) == len(BAD_OPS)
        for error, (_, message) in zip(errors, BAD_OPS, strict=True):
            assert error["reason"] == "bad_op" and message in error["message"], error
        assert table(agent) == before

        # A well-formed unseal request is answered sealed to the host's own key only.
        got, answer = await call("POST", "/v1/secrets/unseal-request", b'{"host_id": "h1"}')
        assert got == 200
        host_key = PrivateKey(
            bytes.fromhex((agent.config.data_dir / "secrets-host.key").read_text())
        )
        kek = SealedBox(host_key).decrypt(base64.b64decode(answer["sealed_key"]))
        with pytest.raises(CryptoError):
            SealedBox(PrivateKey.generate()).decrypt(base64.b64decode(answer["sealed_key"]))

        # The `meshorch site` commands.
        api = agent.config.api_address

        async def cli(*args: str) -> tuple[int, str]:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "meshorch",
                "site",
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await process.communicate()
            return process.returncode or 0, out.decode()

        status_out = "host h1: unsealed\ndata keys [1] (current 1), 0 secret(s), 0 pending\n"
        assert await cli("status", "--agent", api) == (0, status_out)
        code, out = await cli("rotate-keys", SITE, "--agent", api)
        assert code == 0 and "data key 2 is the only one" in out, out
        code, out = await cli("rotate-keys", "other-site", "--agent", api)
        assert code == 2 and "serves site 'lone-site', not 'other-site'" in out, out
        code, out = await cli("lockdown", "--agent", api)
        assert code == 0 and "locked down" in out
        code, out = await cli("rotate-keys", "--agent", api)
        assert code == 2 and "locked_down" in out, out
        code, out = await cli("unlock", "--agent", api)
        assert code == 0 and "unseal the site next" in out
        code, out = await cli("status", "--agent", api)
        assert "host h1: sealed" in out
        key_file = tmp_path / "key"
        key_file.write_text("not a key")
        code, out = await cli("unseal", "--agent", api, "--key-file", str(key_file))
        assert code == 2 and "not an unseal key" in out, out
        key_file.write_text(b64(kek))
        code, out = await cli("unseal", "--agent", api, "--key-file", str(key_file))
        assert code == 0 and "unsealed" in out, out
        code, out = await cli("unseal", "--agent", api, "--key-file", str(key_file))
        assert code == 0 and "was unsealed already" in out, out
        code, out = await cli("status", "--agent", "127.0.0.1:1")
        assert code == 2 and "cannot reach the agent" in out
