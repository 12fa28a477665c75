"""Operator commands against the hub: ``meshorch deploy``, ``sites``, ``apps``, ``tenants``,
``tokens`` and ``audit``. Every listing takes ``--output table|json``.

They talk HTTP to the hub's API (see ``GET /v1/openapi.json``); the hub address and the
operator token come from flags or from ``MESHORCH_HUB`` / ``MESHORCH_TOKEN``, so a CI
pipeline keeps the token in its secret store.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import yaml

from meshorch.cli.agent_client import add_output_flag, print_json
from meshorch.errors import ConfigurationError
from meshorch.sizes import parse_size

HUB_ENV = "MESHORCH_HUB"
TOKEN_ENV = "MESHORCH_TOKEN"
EXIT_ROLLOUT_FAILED = 1
EXIT_TIMEOUT = 4
POLL_S = 0.5


class HubError(ConfigurationError):
    """The hub refused a request or could not be reached."""


def add_fleet_commands(commands: Any) -> None:
    deploy = commands.add_parser(
        "deploy",
        help="deploy an application to the fleet through the hub",
        description="Send an application spec with its placement to the hub. The hub rolls "
        "it out across the matching sites in waves, each gated on the sites reporting the "
        "new version healthy. With --wait, show per-site progress and exit non-zero if the "
        "rollout fails (1) or times out (4).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The spec file is an application spec (docs/app-spec.md) with an optional\n"
        "top-level `placement:` section:\n\n"
        "  placement:\n"
        "    match: {region: eu}            # every label must equal\n"
        "    expressions:\n"
        "      - {key: tier, op: in, values: [store, depot]}\n"
        "      - {key: legacy, op: not exists}\n"
        "    sites: [shop-1, shop-2]        # and/or an explicit list\n"
        "    max_parallel: 5                # sites changed per wave\n\n"
        "example (in CI):\n"
        "  MESHORCH_TOKEN=$HUB_TOKEN meshorch deploy -f app.yaml --hub https://hub:7900 --wait",
    )
    deploy.add_argument("-f", "--file", type=Path, required=True, help="the spec (YAML/JSON)")
    deploy.add_argument("--wait", action="store_true", help="follow the rollout to its end")
    _confirm_flag(deploy, "a placement that stops the app at sites")
    deploy.add_argument(
        "--timeout", type=float, default=900.0, metavar="SECONDS",
        help="with --wait: give up after this long (default %(default)s)",
    )  # fmt: skip
    _hub_flags(deploy)
    deploy.set_defaults(handler=run_deploy)

    sites = commands.add_parser(
        "sites", help="the fleet's sites and their health (from the hub)",
        description="List the sites known to the hub, or show one site's hosts and "
        "application instances.",
    )  # fmt: skip
    sites.add_argument("site", nargs="?", help="a site id: show its hosts and instances")
    sites.add_argument(
        "--selector", metavar="KEY=VALUE,...",
        help="only sites whose labels match (key=value, key!=value, key, !key; all must hold)",
    )  # fmt: skip
    _page_flags(sites)
    add_output_flag(sites)
    _hub_flags(sites)
    sites.set_defaults(handler=run_sites)

    apps = commands.add_parser(
        "apps", help="the fleet's applications and their rollouts (from the hub)",
        description="List the applications the hub deploys, or show one with its status "
        "on each site.",
    )  # fmt: skip
    apps.add_argument("name", nargs="?", help="an application: show it per site")
    apps.add_argument(
        "--delete", action="store_true",
        help="delete the application NAME from the fleet (its sites stop it)",
    )  # fmt: skip
    _confirm_flag(apps, "a deletion")
    _page_flags(apps)
    add_output_flag(apps)
    _hub_flags(apps)
    apps.set_defaults(handler=run_apps)
    _add_tenancy_commands(commands)


def _confirm_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--confirm", type=int, metavar="N",
        help=f"confirm {what} that the hub refused as too large (more than 10%% of an "
        "app's sites, more than 50 sites, or a site left running nothing): N is the number "
        "of sites the hub said it touches, typed after reading its list",
    )  # fmt: skip


def confirmed_path(path: str, args: argparse.Namespace) -> str:
    """``path`` with the operator's ``--confirm N``, if given."""
    confirm = getattr(args, "confirm", None)
    return path if confirm is None else f"{path}?confirm={int(confirm)}"


def _add_tenancy_commands(commands: Any) -> None:
    tenants = commands.add_parser(
        "tenants", help="the hub's tenants (docs/tenants.md)",
        description="List the tenants the token can see (the default action), show one "
        "with its quota, create or delete one (fleet admins), set its quota.",
    )  # fmt: skip
    t_actions = tenants.add_subparsers(dest="tenants_command", metavar="ACTION")
    t_list = t_actions.add_parser("list", help="the tenants your token can see")
    t_show = t_actions.add_parser("show", help="a tenant and its quota")
    t_show.add_argument("tenant", help="the tenant id")
    t_create = t_actions.add_parser("create", help="create a tenant (fleet admin)")
    t_create.add_argument("tenant", help="its id: 1-63 characters of a-z, 0-9 and '-'")
    t_create.add_argument("--description", default="", help="who or what it is")
    t_delete = t_actions.add_parser(
        "delete", help="delete a tenant and revoke its tokens (refused while it owns apps "
        "or secrets)",
    )  # fmt: skip
    t_delete.add_argument("tenant", help="the tenant id")
    t_quota = t_actions.add_parser(
        "quota", help="show a tenant's quota, or set it",
        description="Without a limit: show the quota. With limits: set the whole quota; a "
        "limit left out is unlimited (--unlimited: none at all).",
    )  # fmt: skip
    t_quota.add_argument("tenant", help="the tenant id")
    t_quota.add_argument("--cpu-millis", type=int, metavar="N", help="CPU, in millicores")
    t_quota.add_argument("--memory", metavar="SIZE", help="memory, e.g. 512Mi, 8Gi")
    t_quota.add_argument("--instances", type=int, metavar="N", help="instances")
    t_quota.add_argument("--unlimited", action="store_true", help="remove every limit")
    for parser, handler in (
        (t_list, run_tenants), (t_show, run_tenants), (t_create, run_tenants_create),
        (t_delete, run_tenants_delete), (t_quota, run_tenants_quota), (tenants, run_tenants),
    ):  # fmt: skip
        if parser in (t_list, tenants):
            _page_flags(parser)
            add_output_flag(parser)
        elif parser is t_show:
            add_output_flag(parser)
        _hub_flags(parser)
        parser.set_defaults(handler=handler)

    tokens = commands.add_parser(
        "tokens", help="the hub's API tokens (docs/tenants.md)",
        description="List tokens (no secrets), or create one: its text is printed once "
        "and cannot be shown again.",
    )  # fmt: skip
    actions = tokens.add_subparsers(dest="tokens_command", metavar="ACTION")
    listing = actions.add_parser("list", help="the tokens of your tenant (fleet admin: all)")
    _page_flags(listing)
    add_output_flag(listing)
    _hub_flags(listing)
    listing.set_defaults(handler=run_tokens_list)
    create = actions.add_parser("create", help="create a token and print it once")
    create.add_argument("--role", required=True, choices=("viewer", "operator", "admin"))
    create.add_argument(
        "--tenant", help="its tenant ('*' fleet-wide; default: yours, for a fleet admin "
        "'*' for an admin token and 'default' otherwise)",
    )  # fmt: skip
    create.add_argument("--description", default="", help="what it is for")
    create.add_argument("--expires-in", type=float, metavar="SECONDS", help="lifetime")
    _hub_flags(create)
    create.set_defaults(handler=run_tokens_create)
    revoke = actions.add_parser(
        "revoke", help="revoke a token, and every token created under it",
        description="Revoke a token by its id (from `meshorch tokens list`); the tokens "
        "it created, and theirs, are revoked with it.",
    )  # fmt: skip
    revoke.add_argument("token_id", metavar="ID", help="the token's id (not its secret)")
    _hub_flags(revoke)
    revoke.set_defaults(handler=run_tokens_revoke)
    _page_flags(tokens)
    add_output_flag(tokens)
    _hub_flags(tokens)
    tokens.set_defaults(handler=run_tokens_list)

    audit = commands.add_parser(
        "audit", help="the hub's audit log (admins; docs/tenants.md)",
        description="Show the audit log: every change, refused request and secret access, "
        "of your tenant (a fleet admin sees every tenant's).",
    )  # fmt: skip
    audit.add_argument("--limit", type=int, default=50, help="at most this many entries")
    audit.add_argument("--after", type=int, default=0, metavar="SEQ", help="entries after SEQ")
    audit.add_argument("--tenant", help="only this tenant's entries (fleet admin)")
    add_output_flag(audit)
    _hub_flags(audit)
    audit.set_defaults(handler=run_audit)


def _hub_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--hub", default=os.environ.get(HUB_ENV), metavar="URL",
        help=f"the hub, e.g. https://hub:7900; a replicated hub's URLs, comma-separated "
        f"(default ${HUB_ENV})",
    )  # fmt: skip
    parser.add_argument(
        "--token", default=os.environ.get(TOKEN_ENV),
        help=f"operator token (default ${TOKEN_ENV})",
    )  # fmt: skip


# -- HTTP ---------------------------------------------------------------------------


def _page_flags(parser: argparse.ArgumentParser) -> None:
    """``--limit`` and ``--cursor`` of a listing (without them: every page)."""
    parser.add_argument(
        "--limit", type=int, metavar="N",
        help="one page of at most N items, then the cursor of the next (default: all pages)",
    )  # fmt: skip
    parser.add_argument("--cursor", help="the page after this cursor (printed by --limit)")


def hub_list(
    args: argparse.Namespace, path: str, key: str, query: dict[str, str] | None = None
) -> list[Any]:
    """A paginated listing of the hub (``GET path``): every page, following ``next_cursor``;
    with ``--limit`` or ``--cursor``, that one page, and the next cursor on stderr."""
    from urllib.parse import urlencode

    params = dict(query or {})
    limit, cursor = getattr(args, "limit", None), getattr(args, "cursor", None)
    one_page = limit is not None or cursor is not None
    if limit is not None:
        params["limit"] = str(limit)
    found: list[Any] = []
    while True:
        if cursor is not None:
            params["cursor"] = cursor
        answer = hub_call(args, "GET", f"{path}?{urlencode(params)}" if params else path)
        found += answer[key]
        cursor = answer.get("next_cursor")
        if one_page:
            if cursor is not None:
                print(f"more: --cursor {cursor}", file=sys.stderr)
            return found
        if cursor is None:
            return found


FAILOVER_S = 15.0  # a replicated hub elects a new leader in a few seconds
FAILOVER_PAUSE_S = 0.5


def hub_call(args: argparse.Namespace, method: str, path: str, body: object = None) -> Any:
    """One request to the hub; raises HubError with the hub's own error message. Over
    https the hub's certificate is pinned on first use (``meshorch.cli.known_hubs``).
    ``--hub`` may list a replicated hub's URLs, comma-separated: a replica that cannot be
    reached, or that answers that the request was not applied (no leader yet, the leader
    changed, the leader busy), hands the request to the next one, for up to
    ``FAILOVER_S``."""
    if not args.hub:
        raise ConfigurationError(f"give the hub with --hub URL or ${HUB_ENV}")
    if not args.token:
        raise ConfigurationError(f"give an operator token with --token or ${TOKEN_ENV}")
    bases = [u if "://" in u else f"https://{u}" for u in args.hub.split(",") if u.strip()]
    headers = {"Authorization": f"Bearer {args.token}", "Content-Type": "application/json"}
    data = None if body is None else orjson.dumps(body)
    deadline = time.monotonic() + (FAILOVER_S if len(bases) > 1 else 0.0)
    attempt = 0
    while True:
        base = bases[attempt % len(bases)].strip()
        attempt += 1
        last = time.monotonic() > deadline
        try:
            status, raw = _request_hub(base, method, path, data, headers)
        except _Retry as retry:
            if last:
                raise HubError(str(retry)) from None
            if attempt % len(bases) == 0:
                time.sleep(FAILOVER_PAUSE_S)
            continue
        break
    if status >= 400:
        try:
            error = orjson.loads(raw)["error"]
            message = f"{error['code']}: {error['message']}"
            if error.get("problems") and error["problems"][0] not in message:
                message += "".join(f"\n  - {p}" for p in error["problems"])
            if isinstance(error.get("details"), dict) and "removals" in error["details"]:
                message += what_would_stop(error["details"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            message = raw[:200].decode(errors="replace")
        raise HubError(f"the hub refused ({status}) {message}")
    return orjson.loads(raw)


def what_would_stop(details: dict[str, Any]) -> str:
    """A 409 confirmation_required's list (central_hub.interlock), for a terminal."""
    shown = 20  # site ids per line; the JSON answer (-o json) has them all
    lines = []
    for removal in details["removals"]:
        ids = removal["sites"]
        more = removal["stops_at"] - min(len(ids), shown)
        tail = f" and {more} more" if more > 0 else ""
        lines.append(
            f"\n  {removal['app']}: stops at {removal['stops_at']} of {removal['of']} site(s): "
            f"{', '.join(ids[:shown])}{tail}"
        )
    emptied = details.get("emptied") or []
    if emptied:
        tail = f" and {len(emptied) - shown} more" if len(emptied) > shown else ""
        lines.append(f"\n  left running nothing: {', '.join(emptied[:shown])}{tail}")
    lines.append(f"\n  to go ahead, repeat with --confirm {details['sites']}")
    return "".join(lines)


class _Retry(Exception):
    """This replica did not take the request: the next one may."""


# 503 codes of a replicated hub that guarantee the request was not applied.
_NOT_APPLIED = frozenset({"no_leader", "leader_unreachable", "leader_changed", "hub_busy"})


def _request_hub(
    base: str, method: str, path: str, data: bytes | None, headers: dict[str, str]
) -> tuple[int, bytes]:
    from meshorch.cli import known_hubs

    try:
        status, raw = known_hubs.request(base, method, path, data, headers)
    except known_hubs.HubNotTrusted:
        raise
    except ConnectionRefusedError as exc:  # nothing was sent
        raise _Retry(f"cannot reach the hub at {base}: {exc}") from None
    except OSError as exc:
        if method == "GET":
            raise _Retry(f"cannot reach the hub at {base}: {exc}") from None
        raise HubError(
            f"the hub at {base} did not answer ({exc}): the request may or may not have been "
            "applied; look before sending it again"
        ) from None
    if status == 503:
        try:
            code = orjson.loads(raw)["error"]["code"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            code = ""
        if code in _NOT_APPLIED:
            raise _Retry(f"the hub at {base} answered 503 {code}")
    return status, raw


# -- deploy -------------------------------------------------------------------------


def read_deploy_file(path: Path) -> dict[str, Any]:
    """The spec and its placement, from one YAML or JSON file."""
    try:
        document = yaml.safe_load(path.read_bytes())
    except OSError as exc:
        raise ConfigurationError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"{path}: not YAML or JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigurationError(f"{path}: an application spec is a mapping")
    placement = document.pop("placement", None) or {}
    return {"spec": document, "placement": placement}


def run_deploy(args: argparse.Namespace) -> int:
    deployment = hub_call(
        args, "POST", confirmed_path("/v1/apps", args), read_deploy_file(args.file)
    )
    waves = deployment["waves"]
    print(
        f"deployment {deployment['id']}: {deployment['app']} {deployment['version']} "
        f"to {sum(len(w) for w in waves)} site(s) in {len(waves)} wave(s)"
    )
    if not args.wait:
        print(f"follow it: meshorch apps {deployment['app']}")
        return 0
    return follow(args, deployment["id"], args.timeout)


def follow(args: argparse.Namespace, deployment_id: str, timeout_s: float) -> int:
    """Print each site's progress as it changes until the rollout ends."""
    deadline = time.monotonic() + timeout_s
    shown: dict[str, tuple[str, str]] = {}
    while True:
        deployment = hub_call(args, "GET", f"/v1/deployments/{deployment_id}")
        for site, progress in sorted(deployment["progress"].items()):
            fact = (progress["state"], progress.get("message", ""))
            if shown.get(site) != fact:
                shown[site] = fact
                message = f" ({fact[1]})" if fact[1] else ""
                print(f"  {site:24} {fact[0]}{message}", flush=True)
        state = deployment["state"]
        if state == "succeeded":
            print(f"deployment {deployment_id} succeeded")
            return 0
        if state in ("failed", "superseded"):
            print(f"deployment {deployment_id} {state}: {deployment['reason']}", file=sys.stderr)
            return EXIT_ROLLOUT_FAILED
        if time.monotonic() > deadline:
            print(
                f"deployment {deployment_id} still {state} after {timeout_s:.0f} s "
                f"(wave {deployment['wave'] + 1} of {len(deployment['waves'])})",
                file=sys.stderr,
            )
            return EXIT_TIMEOUT
        time.sleep(POLL_S)


# -- views --------------------------------------------------------------------------


def _ago(then: float | None) -> str:
    return "never" if then is None else f"{max(0.0, time.time() - then):.0f}s ago"


def _health(site: dict[str, Any], short: bool = False) -> str:
    """A site registered but never heard from waits for its agents: not "unknown"."""
    if site["health"] == "unknown" and site["last_seen"] is None:
        return "awaiting" if short else "awaiting first report"
    return str(site["health"])


def run_sites(args: argparse.Namespace) -> int:
    if args.site:
        site = hub_call(args, "GET", f"/v1/sites/{args.site}")
        print(f"site {site['id']}: {_health(site)}, applied delta {site['applied_version']}, "
              f"last seen {_ago(site['last_seen'])}")  # fmt: skip
        print("  labels: " + (", ".join(f"{k}={v}" for k, v in site["labels"].items()) or "-"))
        for host in site["hosts"]:
            print(f"  host {host['host_id']} {'alive' if host['alive'] else 'DOWN'}")
            for i in host["instances"]:
                ready = "ready" if i["ready"] else "not ready"
                print(f"    {i['instance_id']:28} {i['app']} {i['version']} {i['state']} "
                      f"{ready} restarts={i['restarts']}")  # fmt: skip
        for rejection in site.get("rejections", []):
            print(f"  rejected delta {rejection['version']}: {rejection['reason']}: "
                  f"{rejection['message']}")  # fmt: skip
        return 0
    selector = {"selector": args.selector} if args.selector else {}
    sites = hub_list(args, "/v1/sites", "sites", selector)
    if args.output == "json":
        print_json(sites)
        return 0
    print(f"{'SITE':20} {'HEALTH':12} {'APPLIED':>8} {'HOSTS UP':>8} {'READY':>7} "
          f"{'LAST SEEN':>10}  LABELS")  # fmt: skip
    for site in sites:
        labels = ",".join(f"{k}={v}" for k, v in site["labels"].items())
        applied = "-" if site["applied_version"] is None else site["applied_version"]
        counts = site.get("counts") or {}
        print(f"{site['id']:20} {_health(site, short=True):12} {applied:>8} "
              f"{_fraction(counts.get('hosts'), 'up'):>8} "
              f"{_fraction(counts.get('instances'), 'ready'):>7} "
              f"{_ago(site['last_seen']):>10}  {labels}")  # fmt: skip
    return 0


def _fraction(count: dict[str, int] | None, part: str) -> str:
    """``2/3`` from ``{"total": 3, part: 2}``; ``-`` when the hub does not know."""
    return "-" if not count else f"{count[part]}/{count['total']}"


def run_apps(args: argparse.Namespace) -> int:
    if args.delete or args.confirm is not None:
        if not args.name or not args.delete:
            raise ConfigurationError("--delete NAME deletes an application; --confirm goes with it")
        path = confirmed_path(f"/v1/apps/{quote(args.name, safe='')}", args)
        deleted = hub_call(args, "DELETE", path)
        print(f"{args.name} deleted: delta {deleted['delta']} to {len(deleted['sites'])} site(s)")
        return 0
    if args.name:
        app = hub_call(args, "GET", f"/v1/apps/{args.name}")
        deployment = app["deployment"]
        rollout = "-" if deployment is None else f"{deployment['state']} {deployment['reason']}"
        print(f"{app['name']} {app['version']} (tenant {app['tenant']}): rollout {rollout}")
        for site, status in sorted(app["sites"].items()):
            if status is None:
                print(f"  {site:24} no report yet")
            else:
                message = f" ({status['message']})" if status["message"] else ""
                print(f"  {site:24} {status['version']} {status['state']}{message}")
        return 0
    apps = hub_list(args, "/v1/apps", "apps")
    if args.output == "json":
        print_json(apps)
        return 0
    print(f"{'APP':20} {'VERSION':10} {'ROLLOUT':12} SITES")
    for app in apps:
        rollout = "-" if app["deployment"] is None else app["deployment"]["state"]
        print(f"{app['name']:20} {app['version']:10} {rollout:12} {','.join(app['sites'])}")
    return 0


# -- tenants, tokens, audit -----------------------------------------------------------


def _quota_text(quota: dict[str, Any] | None) -> str:
    if not quota:
        return "unlimited"
    return ", ".join(f"{k}={'-' if v is None else v}" for k, v in quota.items())


def run_tenants(args: argparse.Namespace) -> int:
    if getattr(args, "tenant", None):
        tenant = hub_call(args, "GET", f"/v1/tenants/{args.tenant}")
        if args.output == "json":
            print_json(tenant)
            return 0
        print(f"tenant {tenant['id']}: {tenant['description'] or '-'}")
        print(f"  quota: {_quota_text(tenant['quota'])}")
        return 0
    tenants = hub_list(args, "/v1/tenants", "tenants")
    if args.output == "json":
        print_json(tenants)
        return 0
    print(f"{'TENANT':24} {'QUOTA':40} DESCRIPTION")
    for tenant in tenants:
        print(f"{tenant['id']:24} {_quota_text(tenant['quota']):40} {tenant['description']}")
    return 0


def run_tenants_create(args: argparse.Namespace) -> int:
    body = {"id": args.tenant, "description": args.description}
    tenant = hub_call(args, "POST", "/v1/tenants", body)
    print(f"created tenant {tenant['id']}")
    return 0


def run_tenants_delete(args: argparse.Namespace) -> int:
    hub_call(args, "DELETE", f"/v1/tenants/{args.tenant}")
    print(f"deleted tenant {args.tenant} (its tokens are revoked)")
    return 0


def run_tenants_quota(args: argparse.Namespace) -> int:
    limits = {
        "cpu_millis": args.cpu_millis,
        "memory_bytes": None if args.memory is None else parse_size(args.memory),
        "instances": args.instances,
    }
    given = {k: v for k, v in limits.items() if v is not None}
    if args.unlimited and given:
        raise ConfigurationError("--unlimited removes every limit: give no other")
    path = f"/v1/tenants/{args.tenant}/quota"
    if not given and not args.unlimited:
        answer = hub_call(args, "GET", path)
    else:
        answer = hub_call(args, "PUT", path, given)
    print(f"tenant {args.tenant}: quota {_quota_text(answer['quota'])}")
    return 0


def run_tokens_revoke(args: argparse.Namespace) -> int:
    answer = hub_call(args, "DELETE", f"/v1/tokens/{args.token_id}")
    below = answer.get("revoked_descendants") or []
    extra = f", and {len(below)} token(s) created under it" if below else ""
    print(f"revoked token {answer['deleted']}{extra}")
    return 0


def run_tokens_list(args: argparse.Namespace) -> int:
    tokens = hub_list(args, "/v1/tokens", "tokens")
    if args.output == "json":
        print_json(tokens)
        return 0
    print(f"{'ID':18} {'ROLE':9} {'TENANT':20} DESCRIPTION")
    for token in tokens:
        print(f"{token['id']:18} {token['role']:9} {token['tenant']:20} {token['description']}")
    return 0


def run_tokens_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"role": args.role, "description": args.description}
    if args.tenant is not None:
        body["tenant"] = args.tenant
    if args.expires_in is not None:
        body["expires_in_s"] = args.expires_in
    made = hub_call(args, "POST", "/v1/tokens", body)
    print(made["token"])
    print(
        f"token {made['id']}: role {made['role']}, tenant {made['tenant']} "
        "(shown once: keep it now)",
        file=sys.stderr,
    )
    return 0


def run_audit(args: argparse.Namespace) -> int:
    query = f"/v1/audit?after={args.after}&limit={max(1, min(args.limit, 500))}"
    if args.tenant:
        query += f"&tenant={args.tenant}"
    entries = hub_call(args, "GET", query)["entries"]
    if args.output == "json":
        print_json(entries)
        return 0
    for e in entries:
        actor = e["actor"]
        who = "-" if actor is None else f"{actor['token']}({actor['role']}@{actor['tenant']})"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["at"]))
        obj = f"{e['object']['type']}/{e['object']['id']}"
        detail = f" {e['detail']}" if e["detail"] else ""
        print(f"{e['seq']:>6} {when} {who} {e['action']} [{e['tenant']}] {obj} "
              f"{e['outcome']}{detail}")  # fmt: skip
    return 0
