"""A replica of a replicated hub: ``meshorch hub --raft ADDR --peer ADDR=URL ...``.

Three (or five) replicas keep the hub's state in a Raft cluster (``raft.node``, the same
layer the sites use): tenants, tokens, sites, applications, deployments, the signed delta
log, the audit log, alerts, the sealed key files. One process per replica::

    RaftNode      the replicated tables (``central_hub.replicated_store``), DATA_DIR/raft
    Front         the public address: every request to the leader (``central_hub.front``)
                  but the sites' reports and long-polls a follower answers itself
    Hub           only on the leader: the hub itself (API, site link, driver, gossip), over
                  the replicated store, its key files in DATA_DIR/hub; the front hands it
                  requests in-process

Leadership: when this replica becomes the Raft leader it waits until every committed
entry is applied here (a barrier), claims the writer record (which fences out a deposed
leader's late writes), writes the replicated key files into DATA_DIR/hub, and starts the
hub as a restart would (its in-memory indexes built from the replicated state). The delta
signer therefore runs on one replica at a time, and the log cannot fork. When it stops
being the leader, or a write of its hub is refused or of unknown outcome, its hub stops
(long-polls answer, requests in flight get 503) and the front forwards to the new leader.

The KEK (``--kek-file``) is required and is the cluster's one secret: it seals the key
files in the replicated state, and the Raft password and the front's forwarding key are
derived from it. Each replica holds a copy (the ceremony is in README.md).

Soft state stays on the replica it reaches: a follower answers the site reports that
reach it and pushes what changed to the leader once a second (``central_hub.relay``);
the leader keeps them as its own (its LMDB, never through Raft). A follower also answers
the sites' long-polls for deltas from its replicated log, woken by the deltas it applies
for each site (``central_hub.replica_polls``; the leader's answer, byte for byte), and
answers them all at once when the leader changes or it stops. Fleet logs and uploaded
agent wheels stay where they land. After a fail-over, sites report again within seconds;
logs and wheels sent to the old leader are not on the new one. One replay cache per
replica serves its relay and, while it leads, its hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from central_hub import gcpolicy
from central_hub.alerts import over_thresholds
from central_hub.config import LISTEN_BACKLOG, HubConfig
from central_hub.errors import HubConfigError
from central_hub.front import Front, Target, forwarding_key
from central_hub.relay import (
    MAX_RELAY_BYTES,
    RELAY_HEADER,
    RELAY_PATH,
    REPORT_PATH,
    RelayError,
    ReportRelay,
    merge,
    parse_push,
    relay_authentic,
    relay_header,
    relay_recent,
)
from central_hub.replay import NonceCache
from central_hub.replica_polls import POLL_PATH, FollowerPolls
from central_hub.replicated_store import REPLICATED_DBS, ReplicatedStore
from central_hub.report_stream import STREAM_PATH
from central_hub.reports import renew_after
from central_hub.routing import error_response
from central_hub.service import Hub
from central_hub.store import Store
from central_hub.tls import HubTLS
from central_hub.tls import load as load_tls
from meshorch.dirlock import DataDirLock, hold
from meshorch.errors import ConfigurationError
from meshorch.fleet.link_auth import url_host
from meshorch.http_body import read_limited
from raft.config import RaftConfig, datacenter_preset
from raft.node import RaftNode, RaftStatus

logger = logging.getLogger(__name__)

RAFT_DIR = "raft"
HUB_DIR = "hub"
SOFT_DIR = "soft.lmdb"
WATCH_S = 0.1
PUSH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class ReplicaConfig:
    """``raft_address``: this replica's Raft address (host:port); ``peers``: every
    replica's Raft address and public URL, this one included."""

    raft_address: str
    peers: dict[str, str]
    durability: str = "power"

    def validate(self) -> None:
        if self.raft_address not in self.peers:
            raise HubConfigError(
                f"--raft {self.raft_address} is not one of the --peer addresses "
                f"({', '.join(self.peers)}): list every replica, this one included"
            )
        if len(self.peers) < 3:
            raise HubConfigError(
                "a replicated hub needs at least 3 replicas (--peer for each): with fewer, "
                "losing one stops it"
            )


def raft_password(kek: bytes) -> str:
    return hashlib.blake2b(kek, digest_size=32, person=b"meshorch-hubraft").hexdigest()


class HubReplica:
    """One replica (module docstring). ``async with HubReplica(config, replica) as r``."""

    def __init__(self, config: HubConfig, replica: ReplicaConfig) -> None:
        self.config = config
        self.replica = replica
        self.url = ""
        self.tls: HubTLS | None = None
        self.hub: Hub | None = None  # the hub, while this replica leads
        self._node: RaftNode | None = None
        self._local: Store | None = None
        self._runner: web.AppRunner | None = None
        self._lock: DataDirLock | None = None
        self._watch: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()  # the hub's store lost the writer's claim
        self._key = b""
        self._leader: str | None = None  # the Raft leader's address, as the node last said
        self._peer_tls: aiohttp.Fingerprint | bool = True
        # The relay's and, while this replica leads, its hub's; requests that change
        # something signed before this process started are refused (central_hub.replay).
        self.nonces = NonceCache(started_at=config.clock())
        self.relay: ReportRelay | None = None
        self.polls: FollowerPolls | None = None
        self._session: aiohttp.ClientSession | None = None
        self._gc_held = False

    async def __aenter__(self) -> HubReplica:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def node(self) -> RaftNode:
        if self._node is None:
            raise RuntimeError("the replica is not started")
        return self._node

    @property
    def is_leader(self) -> bool:
        return self._node is not None and self._leader == self.replica.raft_address

    def _leader_changed(self, status: RaftStatus) -> None:
        # Kept here: every request asks where to go, a status snapshot costs more.
        changed = status.leader_address != self._leader
        self._leader = status.leader_address
        if changed and self.polls is not None:
            self.polls.interrupt()  # the polls waiting here answer now

    async def start(self) -> None:
        config, replica = self.config, self.replica
        config.validate()
        replica.validate()
        if config.kek is None:
            raise HubConfigError(
                "a replicated hub needs a KEK (--kek-file or MESHORCH_HUB_KEK), the same "
                "on every replica: it seals the keys the replicas share"
            )
        data_dir = config.data_dir
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self._lock = hold(data_dir, "meshorch hub replica")
        except ConfigurationError as exc:
            raise HubConfigError(str(exc)) from None
        try:
            await self._start_parts()
        except BaseException:
            await self.stop()
            raise
        gcpolicy.hold()  # central_hub.gcpolicy; its hub, while it leads, holds it too
        self._gc_held = True
        logger.info(
            "hub replica %s serving on %s, peers %s",
            replica.raft_address,
            self.url,
            ", ".join(replica.peers),
        )

    async def _start_parts(self) -> None:
        config, replica = self.config, self.replica
        assert config.kek is not None
        data_dir = config.data_dir
        self._key = forwarding_key(config.kek.key)
        self._local = await asyncio.to_thread(Store, data_dir / SOFT_DIR)
        node = RaftNode(
            RaftConfig(
                self_address=replica.raft_address,
                data_dir=data_dir / RAFT_DIR,
                password=raft_password(config.kek.key),
                partners=tuple(a for a in replica.peers if a != replica.raft_address),
                tables=REPLICATED_DBS,
                durability=replica.durability,
                **datacenter_preset(),  # type: ignore[arg-type]
            )
        )
        (data_dir / RAFT_DIR).mkdir(mode=0o700, exist_ok=True)
        node.on_leader_change(self._leader_changed)
        await node.start()
        self._node = node
        if not config.insecure_http:
            self.tls = await asyncio.to_thread(
                load_tls, data_dir, config.tls_cert, config.tls_key, config.host, config.kek
            )
            # Replicas share one certificate (README): a follower pins it on the leader.
            self._peer_tls = aiohttp.Fingerprint(bytes.fromhex(self.tls.fingerprint))
        own = url_host(replica.peers[replica.raft_address])
        others = frozenset(
            url_host(url)
            for address, url in replica.peers.items()
            if address != replica.raft_address
        )
        view = ReplicatedStore(node, self._local, data_dir / HUB_DIR, on_lost=lambda: None)
        thresholds = config.alert_thresholds
        self.relay = ReportRelay(
            own, view, self._push, config.clock, self.nonces, config.max_body_bytes,
            watch=lambda report: over_thresholds(report, thresholds),
            full_every_s=renew_after(config.site_stale_s),
        )  # fmt: skip
        await self.relay.start()
        self.polls = FollowerPolls(
            own,
            view,
            self.nonces,
            self.relay,
            config.clock,
            config.max_body_bytes,
            leading=lambda: self.is_leader,
        )
        await self.polls.start()
        node.on_applied(self.polls.applied)
        handlers = {
            ("POST", REPORT_PATH): self._site_report,
            ("POST", RELAY_PATH): self._take,
            ("GET", POLL_PATH): self._site_poll,
            ("GET", STREAM_PATH): self._site_stream,
        }
        front = Front(
            self._key,
            self._route,
            config.max_body_bytes,
            replica.raft_address,
            handlers=handlers,
            other_hosts=others,
        )
        self._runner = web.AppRunner(front.app(), access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            config.host,
            config.port,
            ssl_context=None if self.tls is None else self.tls.context,
            backlog=LISTEN_BACKLOG,
        )
        try:
            await site.start()
        except OSError as exc:
            raise HubConfigError(f"cannot listen on {config.host}:{config.port}: {exc}") from None
        host, port = self._runner.addresses[0][:2]
        scheme = "http" if self.tls is None else "https"
        self.url = (
            f"{scheme}://[{host}]:{port}" if ":" in str(host) else f"{scheme}://{host}:{port}"
        )
        self._watch = asyncio.create_task(self._follow_leadership(), name="hub-replica")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None
        if self.polls is not None:
            await self.polls.stop()  # the polls waiting here answer (the view is open)
        await self._step_down()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._node is not None:
            await self._node.stop()
            self._node = None
        if self._local is not None:
            await asyncio.to_thread(self._local.close)
            self._local = None
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()
        if self._gc_held:
            self._gc_held = False
            await gcpolicy.release()

    # -- where requests go ----------------------------------------------------------------

    def _route(self) -> tuple[Target | web.Application | None, bool]:
        if self.hub is not None and not self._lost.is_set():
            return self.hub.app, True
        leader = self._leader
        if leader is None or leader == self.replica.raft_address:
            return None, False
        url = self.replica.peers.get(leader)
        if url is None:
            return None, False
        return (url.rstrip("/"), self._peer_tls), False

    # -- the sites' reports (central_hub.relay) -------------------------------------------

    def _leading_hub(self) -> Hub | None:
        return None if self._lost.is_set() else self.hub

    async def _site_report(self, request: web.Request) -> web.StreamResponse | bytes | None:
        if self._leading_hub() is not None or self.relay is None:
            return None  # the leader's hub takes it in-process
        return await self.relay.handle(request)

    async def _site_stream(self, request: web.Request) -> web.StreamResponse | bytes | None:
        """A site's report stream (``central_hub.report_stream``), kept here by a follower."""
        if self._leading_hub() is not None or self.relay is None:
            return None  # the leader's hub takes it in-process
        return await self.relay.handle_stream(request)

    async def _site_poll(self, request: web.Request) -> web.StreamResponse | bytes | None:
        """A site's long-poll: answered here by a follower (``central_hub.replica_polls``)."""
        if self._leading_hub() is not None or self.is_leader or self.polls is None:
            return None  # the leader's hub takes it in-process
        if self._leader is None:
            # Maybe cut off from the others (its log behind theirs): 503 no_leader, and
            # the site fails over to another replica.
            return None
        return await self.polls.handle(request)

    async def _take(self, request: web.Request) -> web.StreamResponse:
        """A follower's push: authenticated before its body is looked at."""
        header = request.headers.get(RELAY_HEADER)
        now = self.config.clock()
        if header is None or len(header) > 200 or not relay_recent(header, now):
            return error_response(401, "bad_relay", f"a push carries a recent {RELAY_HEADER}")
        body = await read_limited(request.content, MAX_RELAY_BYTES)
        if len(body) > MAX_RELAY_BYTES or not relay_authentic(self._key, header, body, now):
            return error_response(401, "bad_relay", "the push is not a replica's")
        hub = self._leading_hub()
        if hub is None:
            response = error_response(503, "no_leader", "this replica does not lead")
            response.headers["Retry-After"] = "1"
            return response
        try:
            push = parse_push(body)
        except ValueError as exc:
            return error_response(400, "bad_relay", str(exc))
        answer = await merge(hub.parts, self.nonces, push)
        return web.Response(body=answer, content_type="application/json")

    async def _push(self, body: bytes) -> dict[str, Any]:
        """A push to the leader: in-process when this replica leads."""
        hub = self._leading_hub()
        if hub is not None:
            answer = await merge(hub.parts, self.nonces, parse_push(body))
            return dict(orjson.loads(answer))
        target, _ = self._route()
        if not isinstance(target, tuple):
            raise RelayError("no hub replica is the leader right now")
        base, tls = target
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4))
        headers = {
            RELAY_HEADER: relay_header(self._key, self.config.clock(), body),
            "Content-Type": "application/json",
        }
        timeout = aiohttp.ClientTimeout(total=PUSH_TIMEOUT_S)
        try:
            async with self._session.post(
                base + RELAY_PATH, data=body, headers=headers, ssl=tls, timeout=timeout
            ) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise RelayError(f"the leader answered {resp.status}: {raw[:200]!r}")
                answer = orjson.loads(raw)
        except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError) as exc:
            raise RelayError(f"the leader at {base} did not answer: {exc}") from None
        if not isinstance(answer, dict):
            raise RelayError("the leader's answer is not an object")
        return answer

    # -- leadership -----------------------------------------------------------------------

    async def _follow_leadership(self) -> None:
        while True:
            try:
                leading = self.is_leader
                if self.hub is not None and (not leading or self._lost.is_set()):
                    await self._step_down()
                elif self.hub is None and leading:
                    await self._lead()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("hub replica: leadership change failed; retrying")
                await self._step_down()
                await asyncio.sleep(1.0)
            await asyncio.sleep(WATCH_S)

    async def _lead(self) -> None:
        node, local = self.node, self._local
        assert local is not None
        status = node.status()
        await node.barrier()  # every entry of earlier terms is applied here
        self._lost.clear()
        key_dir = self.config.data_dir / HUB_DIR
        key_dir.mkdir(mode=0o700, exist_ok=True)
        store = ReplicatedStore(node, local, key_dir, on_lost=self._lost.set)
        await store.claim(self.replica.raft_address, status.term)
        await asyncio.to_thread(store.materialise)
        config = self.config
        hub_config = replace(
            config,
            data_dir=key_dir,
            host="127.0.0.1",
            port=0,
            insecure_http=True,
            tls_cert=None,
            tls_key=None,
            gossip_host=config.gossip_address[0],
            gossip_port=config.gossip_address[1],
        )
        hub = Hub(
            hub_config,
            store_factory=lambda _path: store,
            forwarding_key=self._key,
            nonces=self.nonces,
        )
        await hub.start()
        self.hub = hub
        if self.relay is not None:
            # Its streams' reports now go to the hub in-process: the sites reopen them.
            await self.relay.streams.close_all()
        logger.info("hub replica %s leads (term %d)", self.replica.raft_address, status.term)

    async def _step_down(self) -> None:
        hub, self.hub = self.hub, None
        if hub is not None:
            logger.info("hub replica %s stops its hub", self.replica.raft_address)
            with contextlib.suppress(Exception):
                await hub.stop()


def parse_peer(text: str) -> tuple[str, str]:
    """``HOST:PORT=URL`` (a replica's Raft address and its public URL)."""
    address, sep, url = text.partition("=")
    host, colon, port = address.rpartition(":")
    if not sep or not colon or not host or not port.isdigit() or "://" not in url:
        raise HubConfigError(
            f"--peer {text!r}: expected RAFT_HOST:PORT=URL, e.g. 10.0.0.2:7910=https://10.0.0.2:7900"
        )
    return address, url.rstrip("/")
