"""The site DNS server's core: one query in, one decision out (pure, no sockets).

Agents answer ``SERVICE.APP.TENANT.<zone>`` (zone ``site.meshorch`` by default,
case-insensitive) with A records of the ready instances of that service, as an
injected ``Resolve`` callable reports them. ``handle`` turns the bytes of one
query into a ``Reply``:

* ``Answer``  bytes to send back, and the ``outcome`` to count;
* ``Forward`` a name outside the zone: relay ``query`` unchanged (same id) to an
  upstream, check what comes back with ``upstream_reply_ok``, and send
  ``servfail`` when no upstream answers;
* ``Drop``    nothing to answer (no readable header, or a response, not a query).

Answers inside the zone (``AA`` set):

=================================  ====================================================
name                               answer
=================================  ====================================================
``s.a.t.<zone>``, resolve -> list  A: the addresses (rotated by query id, so clients
                                   that take the first spread over the instances);
                                   ANY too; other types (AAAA, ...): NOERROR, no data
``s.a.t.<zone>``, resolve -> []    NOERROR, no data (the service exists, none ready)
``s.a.t.<zone>``, resolve -> None  NXDOMAIN
resolve raises / bad address       SERVFAIL; ``Answer.error`` holds the exception
``<zone>`` itself                  SOA for SOA/ANY, else NOERROR, no data
any other name in the zone         NXDOMAIN (labels that are not ``[a-z0-9-]`` too)
=================================  ====================================================

Negative answers carry the zone's SOA in the authority section with ``ttl`` as
its minimum, so resolvers cache them no longer than positive answers.

Malformed input never raises: a header that cannot be read (under 12 bytes) or
a response is dropped; a non-QUERY opcode gets NOTIMP; anything else that is
not exactly one well-formed question (or is over ``MAX_QUERY_BYTES``) gets
FORMERR built from the header alone. All of these have outcome ``malformed``.

UDP answers fit the client's limit (512 bytes without EDNS, else its payload
size capped at ``EDNS_PAYLOAD``); a longer one is truncated with TC set so the
client asks again over TCP, where answers go up to 65535 bytes.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Resolve = Callable[[str, str, str], list[str] | None]
"""``(service, app, tenant)``, lowercased -> IPv4 addresses of the ready instances
(``[]``: the service exists but none is ready), or None: no such service. Called in
the event loop for every query: it must be a quick in-memory lookup."""

DEFAULT_ZONE = "site.meshorch"
MAX_QUERY_BYTES = 4096
"""Larger queries get FORMERR (UDP) or close the connection (TCP): real ones are tiny."""
EDNS_PAYLOAD = 1232
"""The UDP payload we advertise and the most we send (the DNS flag day 2020 value)."""
MAX_TCP_BYTES = 65535

OUTCOMES = ("answered", "nxdomain", "malformed", "refused", "servfail")

_HEADER = struct.Struct(">HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
_QR = 0x8000
_RD = 0x0100
_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_ZONE_TRANSFERS = (dns.rdatatype.AXFR, dns.rdatatype.IXFR)


@dataclass(frozen=True, slots=True)
class Answer:
    """Send ``wire`` back; ``outcome`` is one of ``OUTCOMES``."""

    wire: bytes
    outcome: str
    error: Exception | None = None  # what the resolver raised, for the log


@dataclass(frozen=True, slots=True)
class Forward:
    """Relay ``query`` to an upstream; ``servfail`` is the answer when none answers."""

    query: bytes
    question: bytes  # the question as an upstream echoes it, for ``upstream_reply_ok``
    servfail: bytes
    name: str  # for logs


@dataclass(frozen=True, slots=True)
class Drop:
    """Send nothing; ``reason`` is for the log."""

    reason: str


Reply = Answer | Forward | Drop


def zone_name(zone: str | dns.name.Name) -> dns.name.Name:
    """The zone as an absolute name; ``ValueError`` when it is not a valid name."""
    if isinstance(zone, dns.name.Name):
        return zone if zone.is_absolute() else zone.concatenate(dns.name.root)
    return _parse_zone(zone)


@lru_cache(maxsize=16)
def _parse_zone(text: str) -> dns.name.Name:
    try:
        name = dns.name.from_text(text)
    except dns.exception.DNSException as exc:
        raise ValueError(f"zone {text!r} is not a valid DNS name: {exc}") from None
    if name == dns.name.root:
        raise ValueError("the zone cannot be the root")
    return name


def handle(
    query: bytes,
    resolve: Resolve,
    zone: str | dns.name.Name,
    ttl: int,
    *,
    forwarding: bool = False,
    tcp: bool = False,
) -> Reply:
    """Decide what to do with one query.

    ``forwarding``: names outside the zone become ``Forward`` (else REFUSED), and
    answers say recursion is available. ``tcp``: the answer may use 65535 bytes.
    """
    if len(query) < _HEADER.size:
        return Drop(f"{len(query)} bytes, shorter than a DNS header")
    qid, flags, qdcount, ancount, nscount, _ = _HEADER.unpack_from(query)
    if flags & _QR:
        # Answering responses would let two servers bounce errors at each other forever.
        return Drop("a response, not a query")
    if dns.opcode.from_flags(flags) != dns.opcode.QUERY:
        return _header_error(qid, flags, dns.rcode.NOTIMP)
    if len(query) > MAX_QUERY_BYTES or qdcount != 1 or ancount or nscount:
        return _header_error(qid, flags, dns.rcode.FORMERR)
    try:
        msg = dns.message.from_wire(query)
    except Exception:
        # Bytes from anyone on the network: whatever the parser trips on is their error.
        return _header_error(qid, flags, dns.rcode.FORMERR)
    origin = zone_name(zone)
    response = dns.message.make_response(
        msg, recursion_available=forwarding, our_payload=EDNS_PAYLOAD
    )
    if msg.edns > 0:
        response.set_rcode(dns.rcode.BADVERS)
        return _render(response, msg, tcp, "malformed")
    question = msg.question[0]
    name = question.name
    if not name.is_subdomain(origin):
        if forwarding:
            wire_q = b"".join(bytes((len(label),)) + label for label in name.labels)
            wire_q += struct.pack(">HH", question.rdtype, question.rdclass)
            response.set_rcode(dns.rcode.SERVFAIL)
            return Forward(
                query=query,
                question=wire_q,
                servfail=_render(response, msg, tcp, "servfail").wire,
                name=name.to_text(),
            )
        response.set_rcode(dns.rcode.REFUSED)
        return _render(response, msg, tcp, "refused")
    response.flags |= dns.flags.AA
    rdclass, rdtype = question.rdclass, question.rdtype
    if rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY) or rdtype in _ZONE_TRANSFERS:
        response.flags &= ~dns.flags.AA
        response.set_rcode(dns.rcode.REFUSED)
        return _render(response, msg, tcp, "refused")
    labels = name.relativize(origin).labels
    if not labels:
        if rdtype in (dns.rdatatype.SOA, dns.rdatatype.ANY):
            response.answer.append(_soa(origin, ttl))
        else:
            response.authority.append(_soa(origin, ttl))
        return _render(response, msg, tcp, "answered")
    key = _service_key(labels)
    if key is None:
        return _nxdomain(response, msg, origin, ttl, tcp)
    try:
        found = resolve(*key)
        addresses = None if found is None else [str(ipaddress.IPv4Address(a)) for a in found]
    except Exception as exc:
        # The resolver is the agent's code: a bug there must not take DNS down.
        response.set_rcode(dns.rcode.SERVFAIL)
        return _render(response, msg, tcp, "servfail", exc)
    if addresses is None:
        return _nxdomain(response, msg, origin, ttl, tcp)
    if addresses and rdtype in (dns.rdatatype.A, dns.rdatatype.ANY):
        start = qid % len(addresses)
        rotated = addresses[start:] + addresses[:start]
        response.answer.append(
            dns.rrset.from_text_list(name, ttl, dns.rdataclass.IN, dns.rdatatype.A, rotated)
        )
    else:
        response.authority.append(_soa(origin, ttl))
    return _render(response, msg, tcp, "answered")


def upstream_reply_ok(forward: Forward, reply: bytes) -> bool:
    """Whether ``reply`` answers the forwarded query: a response with its id and question.

    Anything else arriving on the forwarding socket is ignored (late or spoofed).
    """
    q = forward.question
    end = _HEADER.size + len(q)
    if len(reply) < end or reply[:2] != forward.query[:2] or not reply[2] & 0x80:
        return False
    if _HEADER.unpack_from(reply)[2] != 1:
        return False
    # Names compare case-insensitively (upstreams may randomise case); type and class exactly.
    got = reply[_HEADER.size : end]
    return got[:-4].lower() == q[:-4].lower() and got[-4:] == q[-4:]


def _service_key(labels: tuple[bytes, ...]) -> tuple[str, str, str] | None:
    if len(labels) != 3:
        return None
    out: list[str] = []
    for raw in labels:
        try:
            text = raw.decode("ascii").lower()
        except UnicodeDecodeError:
            return None
        if _LABEL_RE.fullmatch(text) is None:
            return None
        out.append(text)
    return (out[0], out[1], out[2])


def _soa(origin: dns.name.Name, ttl: int) -> dns.rrset.RRset:
    zone = origin.to_text()
    # Serial 1: answers are computed per query, there is no zone to transfer. The
    # last field (minimum) is how long resolvers may cache negative answers.
    soa = f"ns.{zone} hostmaster.{zone} 1 60 60 60 {ttl}"
    return dns.rrset.from_text_list(origin, ttl, dns.rdataclass.IN, dns.rdatatype.SOA, [soa])


def _nxdomain(
    response: dns.message.Message,
    msg: dns.message.Message,
    origin: dns.name.Name,
    ttl: int,
    tcp: bool,
) -> Answer:
    response.set_rcode(dns.rcode.NXDOMAIN)
    response.authority.append(_soa(origin, ttl))
    return _render(response, msg, tcp, "nxdomain")


def _render(
    response: dns.message.Message,
    msg: dns.message.Message,
    tcp: bool,
    outcome: str,
    error: Exception | None = None,
) -> Answer:
    if tcp:
        limit = MAX_TCP_BYTES
    elif msg.edns >= 0:
        limit = max(512, min(msg.payload, EDNS_PAYLOAD))
    else:
        limit = 512
    return Answer(response.to_wire(max_size=limit, prefer_truncation=True), outcome, error)


def _header_error(qid: int, flags: int, rcode: dns.rcode.Rcode) -> Answer:
    # No question section: it may be what could not be parsed.
    out_flags = _QR | (flags & 0x7800) | (flags & _RD) | int(rcode)
    return Answer(_HEADER.pack(qid, out_flags, 0, 0, 0, 0), "malformed")


__all__ = [
    "DEFAULT_ZONE",
    "EDNS_PAYLOAD",
    "MAX_QUERY_BYTES",
    "MAX_TCP_BYTES",
    "OUTCOMES",
    "Answer",
    "Drop",
    "Forward",
    "Reply",
    "Resolve",
    "handle",
    "upstream_reply_ok",
    "zone_name",
]
