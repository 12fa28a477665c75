"""Checking an exported delta log offline, with no hub and no network (pure).

An export (``meshorch deltas export`` from the hub, ``meshorch fleet export`` from a site)
is a file of signed delta envelopes (``meshorch.fleet.delta``), one a line, in version
order, exactly as a site receives them: the full envelopes, or one site's view (format 2
deltas that do not target the site as headers). ``verify_log`` walks it as a site would,
with the same checks (``delta.verify_chain``: fleet, signatures, root rotations, operations
against their signed hash, versions, hash chain), then expiry as of a given time
(``delta.verify_batch``'s rule: a stale delta passes only on the way to a fresh one), then,
when told the head, whether the log reaches it. It stops at the first problem and says
which line, which version and why; ``describe`` says what each delta did.

Where the log starts. A log from version 1 is anchored at the genesis hash. A log that
starts later (``--since V``, or a hub that compacted the deltas before: the export then
starts after its snapshot base) is anchored at its first delta's ``prev``: the deltas
before are not in the file and the link to them is not checked (``LogReport.anchor``
says so). The root key given is trusted either at the log's start (the fleet's root key
then) or at its end (the key the fleet trusts now, ``GET /v1/fleet``): a log signed by
other keys can only end trusting the given key through ``root.rotate`` deltas signed by
it, so either way every signature is checked against a chain of keys that leads to it.

Reasons (``Problem.reason``): those of ``delta.Reason``, and

    empty          no envelope at all
    duplicate      a version given twice
    out_of_order   a version before one that should follow it (the missing one comes later)
    gap            versions missing in the middle
    wrong_root     not signed by the root key given, nor ending trusting it
    truncated      the log ends before the head given
    past_head      the log goes past the head given, or its head hash differs
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from meshorch.fleet import delta as deltas
from meshorch.fleet import interlock
from meshorch.fleet.delta import Delta, DeltaRejected, Target, TrustState

Anchor = Literal["genesis", "first_prev"]
Anchoring = Literal["start", "end"]
MAX_SITES_SHOWN = 5


@dataclass(frozen=True, slots=True)
class Problem:
    """Why the log does not verify: at which line (1-based) and version, when known."""

    reason: str
    message: str
    line: int | None = None
    version: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "message": self.message,
            "line": self.line,
            "version": self.version,
        }

    def __str__(self) -> str:
        where = []
        if self.version is not None:
            where.append(f"version {self.version}")
        if self.line is not None:
            where.append(f"line {self.line}")
        return f"{' '.join(where) or 'log'}: {self.reason}: {self.message}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One delta that verified, and what it did."""

    line: int
    delta: Delta
    envelope: bytes

    @property
    def signed_by(self) -> list[str]:
        return [key for key, _ in deltas.parse(self.envelope)[2]]

    @property
    def actions(self) -> list[str]:
        return describe(self.delta)

    def to_json(self) -> dict[str, Any]:
        d = self.delta
        return {
            "line": self.line,
            "version": d.version,
            "digest": d.digest,
            "issued_at": d.issued_at,
            "expires_at": d.expires_at,
            "target": d.target.to_json(),
            "format": d.format,
            "view": "full" if d.has_ops else "header",
            "signed_by": self.signed_by,
            "actions": self.actions,
        }


@dataclass(slots=True)
class LogReport:
    """What ``verify_log`` found. ``ok`` when no problem."""

    entries: list[Entry] = field(default_factory=list)
    problem: Problem | None = None
    anchor: Anchor = "genesis"
    anchoring: Anchoring = "start"
    trusted_at_end: frozenset[str] = frozenset()
    head: str = deltas.GENESIS_HASH

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def first_version(self) -> int | None:
        return self.entries[0].delta.version if self.entries else None

    @property
    def last_version(self) -> int | None:
        return self.entries[-1].delta.version if self.entries else None

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problem": None if self.problem is None else self.problem.to_json(),
            "first_version": self.first_version,
            "last_version": self.last_version,
            "head_hash": self.head,
            "anchor": self.anchor,
            "root_key_trusted_at": self.anchoring,
            "trusted_at_end": sorted(self.trusted_at_end),
            "deltas": [e.to_json() for e in self.entries],
        }


def verify_log(
    lines: Sequence[bytes],
    root_key: str,
    at: float,
    site: str | None = None,
    head: int | None = None,
    head_hash: str | None = None,
) -> LogReport:
    """Check ``lines`` (one envelope each; blank lines are skipped) against ``root_key``
    as of time ``at`` (module docstring). ``site``: the log is that site's view (headers of
    the deltas that do not target it). ``head``/``head_hash``: the version (and its hash)
    the log must end at."""
    numbered = [(i, raw.strip()) for i, raw in enumerate(lines, 1) if raw.strip()]
    report = LogReport()
    if not numbered:
        report.problem = Problem("empty", "the log holds no delta envelope")
        return report
    first_line, first_raw = numbered[0]
    try:
        first, _, first_sigs = deltas.parse(first_raw)
    except DeltaRejected as exc:
        report.problem = _problem(exc, first_line)
        return report
    report.anchor = "genesis" if first.version == 1 else "first_prev"
    if first.version == 1 and first.prev != deltas.GENESIS_HASH:
        report.problem = Problem(
            "chain_mismatch", "version 1 does not follow the genesis hash", first_line, 1
        )
        return report
    signers = frozenset(key for key, _ in first_sigs)
    report.anchoring = "start" if root_key in signers else "end"
    start_keys = frozenset({root_key}) if report.anchoring == "start" else signers
    state = TrustState(first.fleet, start_keys, first.version - 1, first.prev)
    if not _walk(numbered, state, site, report):
        return report
    # A log cut short cannot end trusting today's key: say that it is cut, first.
    report.problem = _reaches(report, head, head_hash)
    if report.problem is not None:
        return report
    if report.anchoring == "end" and report.trusted_at_end != frozenset({root_key}):
        trusted = ", ".join(sorted(report.trusted_at_end))
        report.problem = Problem(
            "wrong_root",
            f"not signed by root key {root_key[:16]}... and the log does not end trusting it "
            f"(it ends trusting {trusted[:16]}...): the wrong key, or a forged log",
            first_line,
            first.version,
        )
        return report
    report.problem = _expiry(report.entries, at)
    return report


def _walk(
    numbered: Sequence[tuple[int, bytes]], state: TrustState, site: str | None, report: LogReport
) -> bool:
    """Verify every line in order into ``report``; False at the first problem."""
    for position, (line, raw) in enumerate(numbered):
        try:
            delta, after = deltas.verify_chain(raw, state, site, full=site is None)
        except DeltaRejected as exc:
            # A version out of place is said as such, even when its signature failed first
            # (the keys rotated between), then the site's own reason.
            report.problem = (
                _duplicate(exc, line)
                or _out_of_order(numbered, position, state)
                or _gap(exc, line, state)
                or _problem(exc, line, site)
            )
            return False
        state = after
        report.entries.append(Entry(line, delta, raw))
        report.trusted_at_end, report.head = state.trusted_keys, state.head
    return True


def _problem(exc: DeltaRejected, line: int, site: str | None = None) -> Problem:
    message = exc.message
    if exc.reason in ("ops_missing", "proof_missing") and site is None:
        message += " (a site's view? give the site it was exported for)"
    if exc.reason == "unknown_key":
        message = "not signed by a key trusted at this point of the log"
    return Problem(exc.reason, message, line, exc.version)


def _version(raw: bytes) -> int | None:
    try:
        return deltas.parse(raw)[0].version
    except DeltaRejected:
        return None


def _out_of_order(
    numbered: Sequence[tuple[int, bytes]], position: int, state: TrustState
) -> Problem | None:
    """The line at ``position`` is not the next version, and the next one comes later."""
    line, raw = numbered[position]
    found, expected = _version(raw), state.version + 1
    if found is None or found == expected:
        return None
    for later_line, later in numbered[position + 1 :]:
        if _version(later) == expected:
            return Problem(
                "out_of_order",
                f"version {found} comes before version {expected} (line {later_line})",
                line,
                found,
            )
    return None


def _duplicate(exc: DeltaRejected, line: int) -> Problem | None:
    if exc.reason not in ("replay", "rollback"):
        return None
    return Problem("duplicate", f"version {exc.version} was given before", line, exc.version)


def _gap(exc: DeltaRejected, line: int, state: TrustState) -> Problem | None:
    found = exc.version
    if exc.reason != "gap" or found is None:
        return None
    expected = state.version + 1
    missing = f"{expected}" if found == expected + 1 else f"{expected} to {found - 1}"
    return Problem("gap", f"version {missing} missing before version {found}", line, found)


def _expiry(entries: Sequence[Entry], at: float) -> Problem | None:
    """``verify_batch``'s rule: deltas up to the last one still fresh at ``at`` pass."""
    fresh = max((i for i, e in enumerate(entries) if e.delta.expires_at > at), default=-1)
    if fresh == len(entries) - 1:
        return None
    stale = entries[fresh + 1]
    return Problem(
        "expired",
        f"expired {at - stale.delta.expires_at:.0f} s before the time checked, and no later "
        "delta of the log is fresh then: a site would refuse it",
        stale.line,
        stale.delta.version,
    )


def _reaches(report: LogReport, head: int | None, head_hash: str | None) -> Problem | None:
    last = report.entries[-1]
    version = last.delta.version
    if head is not None and version < head:
        return Problem(
            "truncated",
            f"the log ends at version {version}, the head is {head}: "
            f"version {version + 1} and after are missing",
            last.line,
            version,
        )
    if head is not None and version > head:
        return Problem("past_head", f"the log goes past the head {head}", last.line, version)
    if head_hash is not None and report.head != head_hash:
        return Problem(
            "past_head",
            f"version {version} hashes to {report.head[:16]}..., not the head hash given "
            f"{head_hash[:16]}...",
            last.line,
            version,
        )
    return None


# -- what a delta did ------------------------------------------------------------------------


def target_text(target: Target) -> str:
    if target.all:
        return "all sites"
    if target.root and not target.complete:
        member = (
            ""
            if target.proven is None
            else (f", {target.proven} {'among them' if target.sites else 'not among them'}")
        )
        return f"{target.count} sites (Merkle root {target.root[:12]}...{member})"
    sites = sorted(target.sites)
    shown = ",".join(sites[:MAX_SITES_SHOWN])
    more = len(sites) - MAX_SITES_SHOWN
    return f"sites {shown}" + (f" and {more} more" if more > 0 else "")


def describe(delta: Delta) -> list[str]:
    """What ``delta`` did, one text per operation (never a secret's value)."""
    if not delta.has_ops:
        return [f"operations not in this view (for {target_text(delta.target)})"]
    if not delta.ops:
        return ["heartbeat (no operations)"]
    return [describe_op(op) + _confirmation(op) for op in delta.ops]


def _confirmation(op: Mapping[str, Any]) -> str:
    """An operator's confirmation of a large removal (``meshorch.fleet.interlock``)."""
    return f" (confirmed: {op['confirmed']} site(s))" if interlock.is_confirmed(op) else ""


def describe_op(op: Mapping[str, Any]) -> str:
    kind = str(op.get("op"))
    tenant = op.get("tenant")
    owner = "" if tenant is None else f"{tenant}/"
    if kind == "app.put":
        spec = op.get("spec")
        spec = spec if isinstance(spec, dict) else {}
        return f"app.put {owner}{spec.get('name')} version {spec.get('version')}"
    if kind == "app.delete":
        return f"app.delete {owner}{op.get('name')}"
    if kind == "tenant.quota":
        limits = {k: v for k, v in op.items() if k not in ("op", "tenant")}
        shown = ", ".join(f"{k}={v}" for k, v in sorted(limits.items())) or "unlimited"
        return f"tenant.quota {tenant}: {shown}"
    if kind == "secret.put":
        sealed = op.get("sealed")
        count = len(sealed) if isinstance(sealed, dict) else 0
        version = op.get("version")
        return f"secret.put {owner}{op.get('name')} version {version} (sealed to {count} site(s))"
    if kind == "secret.delete":
        return f"secret.delete {owner}{op.get('name')}"
    if kind == "agent.upgrade":
        return (
            f"agent.upgrade to {op.get('version')} (wheel sha256 {str(op.get('digest'))[:16]}...)"
        )
    if kind == deltas.ROTATE_OP:
        return f"root.rotate to key {op.get('new_key')}"
    if kind in ("site.lockdown", "site.unlock", "secrets.rotate", "site.decommission"):
        return kind
    return f"{kind} (an operation this verifier does not know)"
