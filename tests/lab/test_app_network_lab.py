"""Application networking on a lab site in real containers (root, podman, runc,
wireguard-go): service A calls service B by its DNS name across hosts over the overlay,
a client on the site LAN reaches the ingress address, a host dies and both recover,
tenants cannot reach each other's instances, and garbage on the DNS port changes nothing.
Each container has a network namespace of its own on its tenant's bridge; from inside one,
every agent port of every host is refused while the site DNS, the tenant's own instances
and the ingress address answer.

"Killing a host" kills its agent and takes its LAN link down: its containers keep running
but nothing reaches them any more, as when a machine loses power.
"""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.message
import orjson
import pytest

from meshorch.apps.settings import podman_dirs
from meshorch.join.mesh import DEFAULT_RAFT_PORT
from meshorch.lab.agents import API_PORT, LabAgents
from meshorch.lab.lab import Lab
from meshorch.lab.system import CommandResult
from meshorch.net.services import tenant_uid
from tests.lab.podman_app import add_busybox_image
from tests.labutil import require_lab

pytestmark = pytest.mark.lab

IMAGE = "localhost/meshorch-busybox:1"
SHOP = f"""
api_version: meshorch/v1
name: shop
version: "1"
services:
  - name: b
    replicas: 2
    anti_affinity: true
    ingress: {{port: 8080, target_port: 8081}}
    containers:
      - name: httpd
        image: {IMAGE}
        command: ["httpd", "-f", "-p", "8081", "-h", "/www"]
        files: [{{path: /www/index.html, content: "b-ok"}}]
        ports: [{{container_port: 8081}}]
        resources: {{memory_limit: 32Mi, cpu_request: 0.1}}
        probes:
          readiness: {{http: {{port: 8081, path: /}}, period_s: 0.5, timeout_s: 0.5,
                      failure_threshold: 1}}
  - name: a
    containers:
      - name: caller
        image: {IMAGE}
        command:
          - sh
          - -c
          # Debian's static busybox wget crashes (SIGSEGV) on this machine: nslookup asks
          # the resolver podman set (this host's agent), nc makes the HTTP call.
          - >-
            while true; do
            ip=$(nslookup b.shop.acme.site.meshorch | awk '/^Address: /{{print $2; exit}}');
            if [ -n "$ip" ] && printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 1 "$ip" 8081
            | grep -q b-ok; then echo call-ok; else echo "call-fail $ip"; fi; sleep 0.2; done
        resources: {{memory_limit: 16Mi, cpu_request: 0.1}}
"""
VAULT = f"""
api_version: meshorch/v1
name: vault
version: "1"
services:
  - name: s
    containers:
      - name: httpd
        image: {IMAGE}
        command: ["httpd", "-f", "-p", "8082", "-h", "/www"]
        files: [{{path: /www/index.html, content: "globex-secret"}}]
        ports: [{{container_port: 8082}}]
        resources: {{memory_limit: 32Mi, cpu_request: 0.1}}
        probes:
          readiness: {{http: {{port: 8082, path: /}}, period_s: 0.5, timeout_s: 0.5,
                      failure_threshold: 1}}
"""
CLIENT = """
import sys, time, urllib.request
url, end = sys.argv[1], time.time() + float(sys.argv[2])
while time.time() < end:
    start = time.time()
    try:
        body = urllib.request.urlopen(url, timeout=0.5).read()
        print(f"{start:.3f} ok {body.decode()}", flush=True)
    except Exception as exc:
        print(f"{start:.3f} fail {type(exc).__name__}", flush=True)
    time.sleep(0.1)
"""
MENU = f"""
api_version: meshorch/v1
name: menu
version: "1"
services:
  - name: m
    containers:
      - name: httpd
        image: {IMAGE}
        command: ["httpd", "-f", "-p", "8083", "-h", "/www"]
        files: [{{path: /www/index.html, content: "menu-ok"}}]
        ports: [{{container_port: 8083}}]
        resources: {{memory_limit: 32Mi, cpu_request: 0.1}}
        probes:
          readiness: {{http: {{port: 8083, path: /}}, period_s: 0.5, timeout_s: 0.5,
                      failure_threshold: 1}}
"""
# One UDP datagram from a connected socket: "answered", "refused" (ICMP port unreachable:
# a REJECT rule, or nothing bound there) or "silent" (something bound there dropped it).
UDP_PROBE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.5)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(bytes.fromhex(sys.argv[3]))
try:
    s.recv(4096)
    print("answered")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("silent")
"""
# Answers every datagram on 0.0.0.0:PORT with itself.
UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(4096)
    s.sendto(data, peer)
"""
# A DNS query for b.shop.acme.site.meshorch, as the probe's payload.
DNS_QUERY = dns.message.make_query("b.shop.acme.site.meshorch.", "A").to_wire().hex()
WG_PORT = 51820
HOSTS = ("s1-h1", "s1-h2", "s1-h3")


@dataclass
class Site:
    agents: LabAgents
    work: Path
    vip: str

    @property
    def lab(self) -> Lab:
        return self.agents.lab

    def live(self, *but: str) -> str:
        return next(h for h in HOSTS if h not in but)

    def view(self, host: str, app: str) -> dict[str, Any]:
        answer = self.agents.request(host, "GET", f"/v1/apps/{app}?consistency=local")
        assert isinstance(answer, dict) and "instances" in answer, answer
        return answer

    def wait_ready(self, host: str, app: str, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            instances = self.view(host, app)["instances"]
            if len(instances) == count and all(i["ready"] for i in instances):
                return
            time.sleep(0.3)
        raise AssertionError(f"{app} not ready: {self.view(host, app)}")

    def kill_host(self, name: str) -> float:
        ifname = self.lab.plan.host(name).ifname
        self.lab.kill(name)
        killed = time.time()
        self.lab.run(name, ["ip", "link", "set", ifname, "down"], check=True)
        return killed

    def revive_host(self, name: str) -> None:
        ifname = self.lab.plan.host(name).ifname
        self.lab.run(name, ["ip", "link", "set", ifname, "up"], check=True)
        self.lab.restart(name)
        self.agents.wait_ready(name)

    def leader(self, *but: str) -> str:
        status = self.agents.status(self.live(*but))
        assert status is not None and status["leader"], status
        return str(status["leader"])

    def overlay_ip(self, host: str) -> str:
        members = self.agents.request(self.live(), "GET", "/v1/members")["members"]
        return str(next(m["overlay_ip"] for m in members if m["host_id"] == host))

    def podman(self, host: str, *args: str) -> subprocess.CompletedProcess[str]:
        root, runroot = podman_dirs(self.lab.store.data_dir(host))
        argv = [
            "podman", "--root", str(root), "--runroot", str(runroot),
            "--tmpdir", str(runroot / "libpod-tmp"), "--runtime", "runc", *args,
        ]  # fmt: skip
        result = self.lab.run(host, argv, timeout_s=30)
        return subprocess.CompletedProcess(argv, result.returncode, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    require_lab("wg", "wireguard-go", "iptables", "podman", "runc")
    if not Path("/bin/busybox").exists():
        pytest.fail("busybox-static is not installed (/bin/busybox)")
    work = tmp_path_factory.mktemp("net")
    lab = Lab(f"n{secrets.token_hex(2)}", work / "lab")
    agents = LabAgents(lab)
    try:
        lab.up(1, 3)
        subnet = ipaddress.ip_network(lab.plan.site(1).lan_subnet)
        vip = str(subnet.network_address + 200)
        agents.extra_args = ("--ingress-address", f"{vip}/{subnet.prefixlen}")
        agents.start_all()
        add_busybox_image(agents, work)
        for tenant, text in (("acme", SHOP), ("globex", VAULT), ("acme", MENU)):
            answer = agents.request("s1-h1", "POST", f"/v1/apps?tenant={tenant}", text.encode())
            assert "error" not in answer, answer
        found = Site(agents, work, vip)
        found.wait_ready("s1-h1", "shop", 3)
        found.wait_ready("s1-h1", "vault", 1)
        found.wait_ready("s1-h1", "menu", 1)
        yield found
    finally:
        for host in lab.plan.hosts if lab.exists() else []:
            log = lab.store.log_path(host.name)
            if log.exists():
                print(f"--- {host.name} ---\n" + "\n".join(log.read_text().splitlines()[-30:]))
        if lab.exists():
            for host in lab.plan.hosts:  # links a test took down come back for the teardown
                lab.run(host.name, ["ip", "link", "set", host.ifname, "up"])
            agents.teardown()
            lab.down()


def http_get(address: str, port: int, nc: str = "nc") -> str:
    """A shell command printing the page at address:port (busybox nc; see SHOP)."""
    return f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | {nc} -w 2 {address} {port}"


def calls_of_a(site: Site, host: str, since: float) -> list[tuple[float, str]]:
    """A's call results after ``since`` (its captured stdout in acme/shop/logs)."""
    found: list[tuple[float, str]] = []
    start = 1
    while True:
        answer = site.agents.request(host, "GET", f"/v1/streams/acme/shop/logs/events?from={start}")
        events = answer["events"]
        if not events:
            return found
        found += [
            (e["time"], e["payload"])
            for e in events
            if e["time"] >= since and e.get("key", "").startswith("shop.a.")
        ]
        start = answer["next"]


# First: the tests after it kill hosts, and a revived host may keep the ingress address.
def test_a_container_has_its_own_network_and_reaches_no_agent_port_of_any_host(
    site: Site,
) -> None:
    """From inside a real podman container (tenant acme, on its tenant's bridge): the agent's
    API (TCP; UDP: gossip) and Raft ports on loopback, on its host's LAN, overlay and bridge
    gateway addresses and on every other host's LAN and overlay addresses are refused at
    once, and WireGuard's UDP port too; each time the host itself reaches the same port.
    Meanwhile the site DNS answers (UDP and through the resolver), the tenant's other
    instances answer on their hosts' overlay and LAN addresses, and the ingress address
    answers. The agent's socket is not mounted in the container."""
    shop = site.view("s1-h1", "shop")["instances"]
    a = next(i for i in shop if i["service"] == "a")
    caller = f"meshorch-{a['instance_id']}.caller"
    host = a["host"]
    lan = {h.name: h.lan_ip for h in site.lab.plan.hosts}
    overlay = {h: site.overlay_ip(h) for h in HOSTS}
    busybox_nc = "/bin/busybox nc"

    # Its own network namespace: none of the host's addresses, a default route via a bridge.
    look = "ip addr; ip route; find / -xdev -name 'agent.sock*' 2>/dev/null; true"
    inside = in_container(site, host, caller, look)
    assert inside.returncode == 0, inside
    assert overlay[host] not in inside.stdout and lan[host] not in inside.stdout, inside
    gateway = inside.stdout.split("default via ", 1)[1].split()[0]
    assert "agent.sock" not in inside.stdout, inside
    print(f"container {caller} on {host}: gateway {gateway}")

    # The lab's agents serve their API on the LAN and overlay addresses (not 0.0.0.0).
    served = [lan[host], overlay[host]]
    served += [address for h in HOSTS if h != host for address in (lan[h], overlay[h])]
    # A UDP refusal comes back as ICMP port unreachable, which the kernel rate-limits per
    # destination (net.ipv4.icmp_ratelimit: a burst of 6, then one a second), and every
    # probe below is answered to this one container: lift the limit in the lab hosts.
    for h in HOSTS:
        netns = site.lab.plan.node(h).netns
        limit = ["ip", "netns", "exec", netns, "sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"]
        subprocess.run(limit, check=True)
    for address in ["127.0.0.1", gateway, *served]:
        refused = in_container(site, host, caller, http_get(address, API_PORT))
        assert "HTTP/1" not in refused.stdout, (address, refused)
        assert "refused" in refused.stderr, (address, refused)  # reset, not a timeout
        if address in served:
            assert ping_from_host(site, host, address), address
    for address in [overlay[h] for h in HOSTS]:  # Raft listens on the overlay only
        raft = f"nc -w 2 {address} {DEFAULT_RAFT_PORT} </dev/null"
        refused = in_container(site, host, caller, raft)
        assert "refused" in refused.stderr, (address, refused)
        assert tcp_from_host(site, host, address, DEFAULT_RAFT_PORT), address
    # WireGuard listens on every address and drops what is not a handshake: silence from the
    # host, an ICMP error (the reject rule) from the container.
    for address in (lan[host], *[lan[h] for h in HOSTS if h != host]):
        assert udp_from(site, host, caller, address, WG_PORT) == "refused", address
        assert udp_from(site, host, None, address, WG_PORT) == "silent", address
    # Gossip (UDP on the API port) runs only with a hub: a stand-in answers there on every
    # address of every host, the bridge's gateway included.
    echo = [sys.executable, "-c", UDP_ECHO, str(API_PORT)]
    netns = [site.lab.plan.node(h).netns for h in HOSTS]
    echoes = [subprocess.Popen(["ip", "netns", "exec", n, *echo]) for n in netns]
    try:
        time.sleep(0.5)
        for address in (gateway, *served):
            assert udp_from(site, host, None, address, API_PORT) == "answered", address
            assert udp_from(site, host, caller, address, API_PORT) == "refused", address
    finally:
        for echo in echoes:
            echo.kill()
            echo.wait()

    # What a workload is meant to use.
    assert udp_from(site, host, caller, overlay[host], 53, DNS_QUERY) == "answered"
    resolved = in_container(site, host, caller, "nslookup b.shop.acme.site.meshorch")
    b_hosts = sorted({i["host"] for i in shop if i["service"] == "b"})
    for b_host in b_hosts:
        assert overlay[b_host] in resolved.stdout, resolved
        for address in (overlay[b_host], lan[b_host]):
            reached = in_container(site, host, caller, http_get(address, 8081))
            assert "b-ok" in reached.stdout, (address, reached)
    menu = site.view("s1-h1", "menu")["instances"][0]  # another app of the same tenant
    for address in (overlay[menu["host"]], lan[menu["host"]]):
        reached = in_container(site, host, caller, http_get(address, 8083))
        assert "menu-ok" in reached.stdout, (address, reached)
    reached = in_container(site, host, caller, http_get(site.vip, 8080))
    assert "b-ok" in reached.stdout, reached
    # Another tenant's instance, on every address of its host, is not.
    vault = site.view("s1-h1", "vault")["instances"][0]
    for address in (overlay[vault["host"]], lan[vault["host"]]):
        refused = in_container(site, host, caller, http_get(address, 8082))
        assert "globex-secret" not in refused.stdout and "refused" in refused.stderr, refused
        direct = site.lab.run(host, ["sh", "-c", http_get(address, 8082, busybox_nc)])
        assert "globex-secret" in direct.stdout, (address, direct)


def test_a_calls_b_by_name_across_hosts_and_recovers_when_bs_host_dies(site: Site) -> None:
    instances = site.view("s1-h1", "shop")["instances"]
    a_host = next(i["host"] for i in instances if i["service"] == "a")
    b_hosts = [i["host"] for i in instances if i["service"] == "b"]
    victim = next((h for h in b_hosts if h != a_host), b_hosts[0])
    assert victim != a_host, f"A and both Bs share {a_host}: anti-affinity broken? {instances}"
    watcher = site.live(victim)
    deadline = time.monotonic() + 60
    while True:  # A has called B successfully for a while (it starts before B is ready)
        recent = calls_of_a(site, watcher, time.time() - 2)
        if len(recent) >= 5 and all(text == "call-ok" for _, text in recent):
            break
        assert time.monotonic() < deadline, recent
        time.sleep(0.5)

    killed = site.kill_host(victim)
    time.sleep(8)
    after = calls_of_a(site, watcher, killed)
    failures = [t for t, text in after if text.startswith("call-fail")]
    recovered_s = (max(failures) - killed) if failures else 0.0
    print(f"A's calls failed {len(failures)} times; recovered {recovered_s:.2f} s after the kill")
    assert recovered_s < 3.0, after
    assert sum(1 for t, text in after if text == "call-ok" and t > killed + 3) >= 10, after
    site.revive_host(victim)
    site.wait_ready(watcher, "shop", 3)


def test_the_ingress_address_moves_when_its_host_dies(site: Site) -> None:
    router = site.lab.plan.site(1).router_name
    url = f"http://{site.vip}:8080/"
    probe = site.lab.run(router, [sys.executable, "-c", CLIENT, url, "2"], timeout_s=30)
    lines = probe.stdout.splitlines()
    assert lines and all(" ok b-ok" in line for line in lines), probe.stdout + probe.stderr

    holder = site.leader()
    netns = site.lab.plan.node(router).netns
    client = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT, url, "14"],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(2)
    killed = site.kill_host(holder)
    out, _ = client.communicate(timeout=60)
    results = [
        (float(t), what) for t, what, *_ in (line.split(" ", 2) for line in out.splitlines())
    ]
    failures = [t for t, what in results if what == "fail" and t >= killed]
    moved_s = (max(failures) + 0.5 - killed) if failures else 0.0
    print(f"ingress: {len(failures)} failed connections; new ones succeed {moved_s:.2f} s after")
    assert moved_s < 3.0, out
    assert sum(1 for t, what in results if what == "ok" and t > killed + 3) >= 10, out
    assert site.leader(holder) != holder
    site.revive_host(holder)
    site.wait_ready(site.live(), "shop", 3)


def container_pid_uid(site: Site, host: str, container: str) -> tuple[str, str]:
    inspected = site.podman(host, "inspect", "--format", "{{.State.Pid}}", container)
    pid = inspected.stdout.strip()
    assert inspected.returncode == 0 and pid.isdigit(), inspected
    status = site.lab.run(host, ["cat", f"/proc/{pid}/status"]).stdout
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    return pid, uid


def in_container(site: Site, host: str, container: str, command: str) -> CommandResult:
    """Run ``command`` inside a container's namespaces (its network too) as its user (runc
    exec cannot join the cgroups of this machine's hybrid hierarchy; nsenter needs none)."""
    pid, uid = container_pid_uid(site, host, container)
    namespaces = ["-n", "-m", "-u", "-i", "-p"]
    argv = ["nsenter", "-t", pid, *namespaces, "-S", uid, "-G", uid, "sh", "-c", command]
    return site.lab.run(host, argv, timeout_s=30)


def udp_from(site: Site, host: str, container: str | None, address: str, port: int,
             payload: str = "00") -> str:  # fmt: skip
    """UDP_PROBE in a container's network namespace as its user (the image has no Python:
    the host's runs there), or on the host itself when ``container`` is None."""
    probe = [sys.executable, "-c", UDP_PROBE, address, str(port), payload]
    if container is not None:
        probe[0] = "/usr/bin/python3"  # the tenant's uid may not read the test's Python
        pid, uid = container_pid_uid(site, host, container)
        probe = ["nsenter", "-t", pid, "-n", "-S", uid, "-G", uid, *probe]
    result = site.lab.run(host, probe, timeout_s=30)
    assert result.returncode == 0, result
    return result.stdout.strip()


def ping_from_host(site: Site, host: str, address: str) -> bool:
    """Whether the host itself gets the agent's ``GET /v1/ping`` answered at address."""
    script = (
        "import sys, urllib.request\n"
        "url = f'http://{sys.argv[1]}:{sys.argv[2]}/v1/ping'\n"
        "print(urllib.request.urlopen(url, timeout=2).status)\n"
    )
    argv = [sys.executable, "-c", script, address, str(API_PORT)]
    result = site.lab.run(host, argv, timeout_s=30)
    return result.returncode == 0 and result.stdout.strip() == "204"


def tcp_from_host(site: Site, host: str, address: str, port: int) -> bool:
    """Whether the host itself (its own network, as root) connects to address:port."""
    script = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 2)"
    result = site.lab.run(host, [sys.executable, "-c", script, address, str(port)], timeout_s=30)
    return result.returncode == 0


def test_a_tenant_cannot_connect_to_another_tenants_instance(site: Site) -> None:
    shop = site.view("s1-h1", "shop")["instances"]
    vault = site.view("s1-h1", "vault")["instances"][0]
    a = next(i for i in shop if i["service"] == "a")
    b = next(i for i in shop if i["service"] == "b")
    caller = f"meshorch-{a['instance_id']}.caller"
    pid = site.podman(a["host"], "inspect", "--format", "{{.State.Pid}}", caller).stdout.strip()
    status = site.lab.run(a["host"], ["cat", f"/proc/{pid}/status"]).stdout
    assert f"Uid:\t{tenant_uid('acme')}\t" in status  # runs as its tenant's uid
    own = (site.overlay_ip(b["host"]), 8081)
    other = (site.overlay_ip(vault["host"]), 8082)
    reached = in_container(site, a["host"], caller, http_get(*own))
    assert reached.returncode == 0 and "b-ok" in reached.stdout, reached
    refused = in_container(site, a["host"], caller, http_get(*other))
    assert "globex-secret" not in refused.stdout, refused
    assert "refused" in refused.stderr, refused  # reset by the rule, not a timeout
    # The host itself (not a tenant's uid) still reaches both.
    direct = site.lab.run(a["host"], ["sh", "-c", http_get(*other, nc="/bin/busybox nc")])
    assert "globex-secret" in direct.stdout, direct
    guard = f"meshorch-{vault['instance_id']}.httpd"
    back = in_container(site, vault["host"], guard, http_get(*own))
    assert "b-ok" not in back.stdout and "refused" in back.stderr, back


def test_garbage_on_the_dns_port_changes_nothing(site: Site) -> None:
    host = site.live()
    overlay = site.overlay_ip(host)
    script = (
        "import os, socket, sys\n"
        "import dns.exception, dns.message, dns.query\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for n in range(2000):\n"
        "    s.sendto(os.urandom(n % 700), (sys.argv[1], 53))\n"
        "q = dns.message.make_query('b.shop.acme.site.meshorch.', 'A')\n"
        # A flood may overflow the socket's buffer: the query is retried, the agent must answer.
        "for attempt in range(10):\n"
        "    try:\n"
        "        r = dns.query.udp(q, sys.argv[1], timeout=2)\n"
        "        break\n"
        "    except dns.exception.Timeout:\n"
        "        pass\n"
        "print(sorted(i.address for rr in r.answer for i in rr))\n"
    )
    result = site.lab.run(host, [sys.executable, "-c", script, overlay], timeout_s=60)
    assert result.returncode == 0, result.stderr
    answered = orjson.loads(result.stdout.strip().replace("'", '"'))
    b_hosts = {i["host"] for i in site.view(host, "shop")["instances"] if i["service"] == "b"}
    assert sorted(answered) == sorted(site.overlay_ip(h) for h in b_hosts)
    assert site.agents.status(host) is not None  # the agent still serves
