"""The operator CLI over several replica URLs: an answer that says the request was not
applied hands it to the next replica; one that may have applied it does not. Real HTTP
servers on loopback stand in for the replicas (their answers scripted)."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest

from meshorch.cli import fleet


class Replica:
    """An HTTP server answering every request with ``status`` and the error ``code``."""

    def __init__(self, status: int, code: str | None) -> None:
        self.requests = 0
        replica = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                replica.requests += 1
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = (
                    orjson.dumps({"ok": True})
                    if code is None
                    else orjson.dumps({"error": {"code": code, "message": code}})
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def replicas() -> Iterator[list[Replica]]:
    made: list[Replica] = []
    yield made
    for replica in made:
        replica.close()


def call(urls: list[str]) -> object:
    args = argparse.Namespace(hub=",".join(urls), token="a-token")
    return fleet.hub_call(args, "POST", "/v1/apps", {"spec": {}})


@pytest.mark.parametrize("code", ["hub_busy", "leader_changed", "no_leader"])
def test_a_request_not_applied_goes_to_the_next_replica(replicas: list[Replica], code: str) -> None:
    busy, serving = Replica(503, code), Replica(200, None)
    replicas += [busy, serving]
    assert call([busy.url, serving.url]) == {"ok": True}
    assert (busy.requests, serving.requests) == (1, 1)


def test_a_request_that_may_be_applied_is_not_sent_again(replicas: list[Replica]) -> None:
    unsure, serving = Replica(503, "outcome_unknown"), Replica(200, None)
    replicas += [unsure, serving]
    with pytest.raises(fleet.HubError, match="outcome_unknown"):
        call([unsure.url, serving.url])
    assert (unsure.requests, serving.requests) == (1, 0)
