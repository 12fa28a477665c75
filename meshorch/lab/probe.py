"""Tiny network probes to run inside lab namespaces, so tests need no ``ping`` binary.

    python -m meshorch.lab.probe ping 172.30.0.2
    python -m meshorch.lab.probe mcast-recv --iface 10.1.0.11
    python -m meshorch.lab.probe mcast-send --iface 10.1.0.12 hello

``ping`` sends ICMP echo requests over a raw socket (root); exit 0 on any reply.
``mcast-recv`` joins a group (mDNS's by default) on one interface address, prints
``ready`` once joined, then the first datagram; ``mcast-send`` sends a few datagrams.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import struct
import sys
import time

ICMP_ECHO_REPLY = 0
ICMP_ECHO_REQUEST = 8
MDNS_GROUP = "224.0.0.251"
MDNS_PORT = 5353


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes = b"meshorch-lab") -> bytes:
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    csum = checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, csum, ident, seq) + payload


def parse_echo_reply(packet: bytes) -> tuple[str, int, int] | None:
    """(source, ident, seq) of an IPv4 packet holding an ICMP echo reply, else None."""
    if len(packet) < 20:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8:
        return None
    icmp_type, _code, _csum, ident, seq = struct.unpack("!BBHHH", packet[ihl : ihl + 8])
    if icmp_type != ICMP_ECHO_REPLY:
        return None
    return socket.inet_ntoa(packet[12:16]), ident, seq


def ping(address: str, *, count: int = 3, timeout_s: float = 1.0) -> bool:
    """True if ``address`` answers any of ``count`` echo requests within ``timeout_s`` each."""
    ident = os.getpid() & 0xFFFF
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        for seq in range(1, count + 1):
            try:
                sock.sendto(echo_request(ident, seq), (address, 0))
            except OSError:  # no route, or a local DROP rule: EPERM
                time.sleep(timeout_s)
                continue
            deadline = time.monotonic() + timeout_s
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    break
                reply = parse_echo_reply(sock.recv(65535))
                if reply == (address, ident, seq):
                    return True
    return False


def mcast_recv(iface_ip: str, group: str, port: int, timeout_s: float) -> tuple[str, bytes] | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("", port))
        membership = socket.inet_aton(group) + socket.inet_aton(iface_ip)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        print("ready", flush=True)
        sock.settimeout(timeout_s)
        try:
            data, (source, _port) = sock.recvfrom(65535)
        except TimeoutError:
            return None
        return source, data


def mcast_send(
    iface_ip: str, group: str, port: int, message: bytes, repeat: int, interval_s: float
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface_ip))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)  # as mDNS does
        for i in range(repeat):
            sock.sendto(message, (group, port))
            if i + 1 < repeat:
                time.sleep(interval_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshorch.lab.probe", description=__doc__)
    sub = parser.add_subparsers(dest="probe", required=True)
    p = sub.add_parser("ping", help="ICMP echo; exit 0 if answered")
    p.add_argument("address")
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=1.0, help="per request")
    r = sub.add_parser("mcast-recv", help="wait for one multicast datagram; exit 0 if any")
    s = sub.add_parser("mcast-send", help="send multicast datagrams")
    for q in (r, s):
        q.add_argument("--iface", required=True, metavar="IP", help="local interface address")
        q.add_argument("--group", default=MDNS_GROUP)
        q.add_argument("--port", type=int, default=MDNS_PORT)
    r.add_argument("--timeout-s", type=float, default=10.0)
    s.add_argument("message")
    s.add_argument("--repeat", type=int, default=20)
    s.add_argument("--interval-s", type=float, default=0.2)
    args = parser.parse_args(argv)
    if args.probe == "ping":
        ok = ping(args.address, count=args.count, timeout_s=args.timeout_s)
        print(f"{args.address}: {'reply' if ok else 'no reply'}")
        return 0 if ok else 1
    if args.probe == "mcast-recv":
        got = mcast_recv(args.iface, args.group, args.port, args.timeout_s)
        if got is None:
            print("timeout", flush=True)
            return 1
        print(f"from {got[0]}: {got[1].decode(errors='replace')}", flush=True)
        return 0
    mcast_send(
        args.iface, args.group, args.port, args.message.encode(), args.repeat, args.interval_s
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
