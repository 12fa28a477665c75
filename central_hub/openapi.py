"""The OpenAPI 3.1 document of the hub's API, generated from the route table (pure).

``document(routes)`` lists every route of ``central_hub.api.ROUTES`` with its auth scheme,
query parameters, request body and answer; the shapes are the JSON schemas below.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from central_hub import authz, placement
from central_hub.fleetview import MAX_ITEMS, MAX_TEXT
from central_hub.logs import MAX_PUSH_STREAMS
from central_hub.model import ID_PATTERN, LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, MAX_LABELS
from central_hub.tenancy import MAX_DESCRIPTION
from meshorch.apps.quotas import MAX_CPU_MILLIS, MAX_INSTANCES, MAX_MEMORY_BYTES
from meshorch.secrets.keyring import MAX_SECRET_BYTES, SECRET_NAME_PATTERN

if TYPE_CHECKING:
    from central_hub.routing import Route

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: Sequence[str] = (), **properties: Schema) -> Schema:
    return {"type": "object", "properties": properties, "required": list(required)}


def _closed(required: Sequence[str] = (), **properties: Schema) -> Schema:
    """A request body's object: a field it does not list is refused (field_not_allowed)."""
    return {**_obj(required, **properties), "additionalProperties": False}


def _list(item: Schema) -> Schema:
    return {"type": "array", "items": item}


def _pattern(regex: str, **more: Any) -> Schema:
    return {"type": "string", "pattern": f"^(?:{regex})$", **more}


_STR: Schema = {"type": "string"}
_INT: Schema = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
_NUM: Schema = {"type": "number"}
_BOOL: Schema = {"type": "boolean"}
_HEX64: Schema = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_DIGEST: Schema = {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}  # spec_digest
_NULLABLE_NUM: Schema = {"type": ["number", "null"]}
_ID: Schema = _pattern(ID_PATTERN)
_LABELS: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
# Labels as a request gives them (central_hub.model.label_problems).
_LABELS_IN: Schema = {
    "type": "object",
    "maxProperties": MAX_LABELS,
    "propertyNames": _pattern(LABEL_KEY_PATTERN),
    "additionalProperties": _pattern(LABEL_VALUE_PATTERN),
    "x-error": "bad_labels",
}
_DESCRIPTION: Schema = {"type": "string", "maxLength": MAX_DESCRIPTION, "x-error": "bad_request"}
# Text and lists of a site report (central_hub.fleetview).
_TEXT: Schema = {"type": "string", "maxLength": MAX_TEXT}
_TEXT_OR_NULL: Schema = {"type": ["string", "null"], "maxLength": MAX_TEXT}


def _items(item: Schema) -> Schema:
    return {**_list(item), "maxItems": MAX_ITEMS}


# The cursor of the next page of a paginated listing; null on the last page.
_CURSOR: Schema = {"type": ["string", "null"]}
PAGINATION = (
    "Listings of sites, applications, tokens, tenants and secrets are paginated in key "
    "order (keyset: a walk started before records were added or removed returns every "
    "record present throughout exactly once): `limit` (1-1000, default 100) and `cursor`, "
    "the `next_cursor` of the previous page, null on the last one. A cursor is opaque, "
    "and good for its listing and the caller's tenant only (else 400 bad_cursor); a "
    "filtered page may hold fewer than `limit` items while more follow. Sites are "
    "filtered by labels with `selector` (key=value, key!=value, key, !key; "
    "comma-separated, all must hold; 400 bad_selector)."
)

SCHEMAS: dict[str, Schema] = {
    "Empty": {"type": "object"},
    "Object": {"type": "object", "additionalProperties": True},
    "Error": _obj(
        ["error"],
        error=_obj(
            ["code", "message"],
            code=_STR,
            message=_STR,
            problems=_list(_STR),
            details={
                "type": "object",
                "description": "what the error is about, e.g. a 409 confirmation_required's "
                "list of what the change would stop (docs/interlock.md)",
            },
        ),
    ),
    "Fleet": _obj(
        ["fleet", "root_key", "head"], fleet=_STR, root_key=_HEX64, head=_INT, head_hash=_HEX64
    ),
    "Rotation": _obj(
        ["root_key", "previous_key", "version"],
        root_key=_HEX64,
        previous_key=_HEX64,
        version=_INT,
        retired_file=_STR,
    ),
    "Envelope": _obj(
        ["body", "sigs"],
        body={"type": "string", "description": "the signed delta body (canonical JSON)"},
        sigs=_list(_obj(["key", "sig"], key=_HEX64, sig=_STR)),
        ops={
            "type": "string",
            "description": "format 2: the operations (canonical JSON, hashed by the body's "
            "ops_hash); only in the deltas that target the site (docs/fleet-link.md)",
        },
        targets={
            **_list(_STR),
            "description": "a Merkle target's sites, sorted (the hub's full envelope)",
        },
        proof={
            "type": "object",
            "description": "a Merkle target's proof that the site is or is not one of its "
            "sites (a site's view; docs/fleet-link.md)",
        },
    ),
    "DeltaList": _obj(
        ["head", "deltas"],
        head=_INT,
        deltas=_list(
            _obj(
                ["version"],
                version=_INT,
                format={"type": "integer", "enum": [1, 2]},
                digest=_HEX64,
                prev=_HEX64,
                issued_at=_NUM,
                expires_at=_NUM,
                target={
                    "type": "object",
                    "description": '{"all": true}, {"sites": [ids]} or {"merkle": root, '
                    '"count": n, "sites": [ids]} (signed: the root and the count)',
                },
                ops=_list({"type": "object"}),
                signed_by=_list(_HEX64),
            )
        ),
        delta_format=_obj(
            ["mode", "issuing"],
            mode={"type": "string", "enum": ["auto", "1", "2"]},
            issuing={"type": "integer", "enum": [1, 2]},
            held_back_by=_list(_STR),
            held_back_count=_INT,
        ),
    ),
    "LinkDeltas": _obj(["head", "deltas"], head=_INT, deltas=_list(_ref("Envelope"))),
    "LinkSnapshot": _obj(
        ["version", "snapshot", "rotations"],
        version=_INT,
        snapshot=_ref("Envelope"),
        rotations=_list(_ref("Envelope")),
    ),
    "Head": _obj(["head"], head=_INT, site_head=_INT),
    "EnrollRequest": _closed(
        ["site", "public_key", "token"],
        site={**_ID, "x-error": "bad_site_id"},
        public_key={**_HEX64, "x-error": "bad_public_key"},
        token={"type": "string", "x-error": "bad_enroll_token"},
    ),
    "EnrollResponse": _obj(["site"], site=_ID),
    "KeyRotation": {
        **_closed(
            ["public_key", "time", "proof"],
            public_key=_HEX64,
            time=_NUM,
            proof={
                "type": "string",
                "pattern": "^[0-9a-f]{128}$",
                "description": "the new key's signature (docs/fleet-link.md)",
            },
        ),
        "x-error": "bad_key_rotation",
        "x-unknown-field-error": "bad_key_rotation",
    },
    "SiteKey": _closed(["public_key"], public_key={**_HEX64, "x-error": "bad_public_key"}),
    "KeyRotated": _obj(
        ["site", "public_key", "rotated"], site=_ID, public_key=_HEX64, rotated=_BOOL
    ),
    "GossipInfo": _obj(
        ["cert", "hub", "preset", "peers"],
        cert={"type": "string", "description": "base64 member certificate (gossip.auth)"},
        expires_at=_NUM,
        hub=_obj(["id", "addr"], id=_STR, addr=_STR),
        preset={"enum": ["wan", "lan", "local"]},
        peers=_list(_obj(["id", "addr"], id=_ID, addr=_STR)),
    ),
    # A site's report, as central_hub.fleetview.parse_report reads it.
    "SiteReport": {
        **_obj(
            ["v", "site", "time", "applied_version", "applied_head"],
            v={"const": 1},
            site=_ID,
            time=_NUM,
            applied_version=_INT,
            applied_head=_TEXT,
            rejections=_items(
                _obj(
                    ["reason", "at"],
                    reason=_TEXT,
                    message=_TEXT_OR_NULL,
                    version={**_INT, "type": ["integer", "null"]},
                    at=_NUM,
                )
            ),
            hosts=_items(
                _obj(
                    ["host_id", "alive"],
                    host_id=_TEXT,
                    alive=_BOOL,
                    instances=_items(
                        _obj(
                            ["app", "instance_id", "state"],
                            app=_TEXT,
                            instance_id=_TEXT,
                            service=_TEXT_OR_NULL,
                            version=_TEXT_OR_NULL,
                            state=_TEXT,
                            ready=_BOOL,
                            restarts=_INT,
                        )
                    ),
                    agent_version=_TEXT,
                    protocol=_INT,
                    resources=_obj(
                        [], load1=_NUM, memory_used_pct=_NUM, disk_used_pct=_NUM, at=_NUM
                    ),
                )
            ),
            apps={
                "type": "object",
                "maxProperties": MAX_ITEMS,
                "additionalProperties": _obj(
                    ["version", "state"],
                    version=_TEXT,
                    desired=_INT,
                    ready=_INT,
                    state={"enum": ["healthy", "progressing", "failed"]},
                    message=_TEXT_OR_NULL,
                ),
            },
            agent_upgrade={
                "oneOf": [
                    _obj(
                        ["version", "state"],
                        version=_TEXT,
                        state=_TEXT,
                        current=_TEXT_OR_NULL,
                        hosts_upgraded=_INT,
                        hosts=_INT,
                        failed={
                            "type": ["object", "null"],
                            "properties": {"host": _TEXT},
                            "required": ["host"],
                        },
                    ),
                    {"type": "null"},
                ],
            },
            decommission={
                "oneOf": [
                    _obj(
                        ["state", "version"],
                        state={"enum": ["running", "stopping", "done"]},
                        version=_INT,
                    ),
                    {"type": "null"},
                ],
            },
        ),
        "x-error": "bad_report",
    },
    "TokenRequest": _closed(
        ["role"],
        role={"enum": ["viewer", "operator", "admin"], "x-error": "bad_role"},
        tenant={
            "type": "string",
            "pattern": f"^(?:\\*|{ID_PATTERN})$",
            "description": '"*" for every tenant (fleet admins)',
            "x-error": "bad_tenant",
        },
        description=_DESCRIPTION,
        expires_in_s={
            "type": "number",
            "exclusiveMinimum": 0,
            "exclusiveMaximum": 100 * 365 * 86400,
            "x-error": "bad_request",
        },
    ),
    "Token": _obj(
        ["id", "role", "tenant", "created_at"],
        id=_STR,
        role={"enum": ["viewer", "operator", "admin"]},
        tenant=_STR,
        created_at=_NUM,
        expires_at=_NULLABLE_NUM,
        description=_STR,
        parent={"type": ["string", "null"], "description": "the token that created it"},
    ),
    "TokenRevoked": _obj(
        ["deleted", "revoked_descendants"], deleted=_STR, revoked_descendants=_list(_STR)
    ),
    "NewToken": {
        "allOf": [
            _ref("Token"),
            _obj(["token"], token={"type": "string", "pattern": "^mht_[0-9a-f]+_[0-9a-f]+$"}),
        ]
    },
    "TokenList": _obj(["tokens", "next_cursor"], tokens=_list(_ref("Token")), next_cursor=_CURSOR),
    "TenantRequest": _closed(["id"], id={**_ID, "x-error": "bad_tenant"}, description=_DESCRIPTION),
    "Tenant": _obj(
        ["id", "description", "created_at", "quota"],
        id=_ID,
        description=_STR,
        created_at=_NUM,
        quota={"oneOf": [_ref("Quota"), {"type": "null"}]},
    ),
    "TenantList": _obj(
        ["tenants", "next_cursor"], tenants=_list(_ref("Tenant")), next_cursor=_CURSOR
    ),
    "TenantDeleted": _obj(["deleted"], deleted=_ID, revoked_tokens=_list(_STR)),
    "Quota": {
        **_closed(
            [],
            cpu_millis={"type": ["integer", "null"], "minimum": 0, "maximum": MAX_CPU_MILLIS},
            memory_bytes={"type": ["integer", "null"], "minimum": 0, "maximum": MAX_MEMORY_BYTES},
            instances={"type": ["integer", "null"], "minimum": 0, "maximum": MAX_INSTANCES},
        ),
        "x-error": "bad_quota",
    },
    "QuotaSet": _obj(
        ["tenant", "quota"],
        tenant=_ID,
        quota={"oneOf": [_ref("Quota"), {"type": "null"}]},
        delta=_INT,
    ),
    "AuditEntry": _obj(
        ["seq", "at", "actor", "action", "tenant", "object", "outcome"],
        seq=_INT,
        at=_NUM,
        actor={
            "oneOf": [
                _obj(["token", "role", "tenant"], token=_STR, role=_STR, tenant=_STR),
                {"type": "null"},
            ]
        },
        action=_STR,
        tenant=_STR,
        object=_obj(["type", "id"], type=_STR, id=_STR),
        outcome=_STR,
        detail=_STR,
    ),
    "AuditList": _obj(["entries", "last"], entries=_list(_ref("AuditEntry")), last=_INT),
    "Deleted": _obj(["deleted"], deleted=_STR),
    "Labels": {**_LABELS_IN, "x-not-object-error": "bad_labels"},
    "SiteLabels": _obj(["id", "labels"], id=_ID, labels=_LABELS),
    "SiteRequest": _closed(
        ["id"],
        id={**_ID, "x-error": "bad_site_id"},
        labels=_LABELS_IN,
        public_key={**_HEX64, "x-error": "bad_public_key"},
    ),
    "NewSite": _obj(
        ["id", "labels", "public_key"],
        id=_ID,
        labels=_LABELS,
        public_key={"type": ["string", "null"]},
        enroll_token={"type": "string", "description": "single-use; only without public_key"},
        enroll_expires_at=_NUM,
    ),
    "SiteSummary": _obj(
        ["id", "labels", "applied_version", "head", "last_seen", "health"],
        id=_ID,
        labels=_LABELS,
        enrolled=_BOOL,
        applied_version={"type": ["integer", "null"]},
        head={"type": ["string", "null"]},
        last_seen=_NULLABLE_NUM,
        seen_via={"enum": ["link", "gossip", None]},
        health={"enum": ["healthy", "degraded", "unreachable", "unknown"]},
        agent_versions=_list(_STR),
        counts={
            "oneOf": [_ref("SiteCounts"), {"type": "null"}],
            "description": "null: the site was never heard from",
        },
    ),
    "SiteCounts": {
        **_obj(
            ["source", "hosts", "apps", "instances"],
            source={"enum": ["report", "gossip"]},
            hosts=_obj(["total", "up"], total=_INT, up=_INT),
            apps={
                "oneOf": [_obj(["total", "healthy"], total=_INT, healthy=_INT), {"type": "null"}],
                "description": "null from gossip in a tenant's view (a summary is fleet-wide); "
                "from gossip, healthy means not failed",
            },
            instances={
                "oneOf": [_obj(["total", "ready"], total=_INT, ready=_INT), {"type": "null"}],
                "description": "null from gossip (a summary has no instances)",
            },
        ),
        "description": "From the site's latest report, or its gossip summary when only that "
        "is fresh; a tenant token's counts cover its tenant's applications only "
        "(docs/fleet-link.md)",
    },
    "SiteList": _obj(
        ["sites", "next_cursor"], sites=_list(_ref("SiteSummary")), next_cursor=_CURSOR
    ),
    "SiteDetail": {
        "allOf": [
            _ref("SiteSummary"),
            _obj(
                ["hosts", "rejections", "apps"],
                public_key={"type": ["string", "null"]},
                key_rotated_at=_NULLABLE_NUM,
                key_rotations=_INT,
                report_received_at=_NULLABLE_NUM,
                gossip={
                    "type": ["object", "null"],
                    "description": "the site's last gossip summary (docs/fleet-link.md)",
                },
                gossip_member={"type": ["string", "null"]},
                hosts={"type": "array", "items": {"type": "object"}},
                rejections={"type": "array", "items": {"type": "object"}},
                apps={"type": "object"},
            ),
        ]
    },
    "Placement": {
        **_closed(
            [],
            match={**_LABELS_IN, "x-error": "bad_placement"},
            expressions={
                **_list(
                    {
                        "oneOf": [
                            _closed(
                                ["key", "op", "values"],
                                key=_pattern(LABEL_KEY_PATTERN),
                                op={"enum": ["in", "not in"]},
                                values={
                                    **_list(_STR),
                                    "minItems": 1,
                                    "maxItems": placement.MAX_VALUES,
                                },
                            ),
                            _closed(
                                ["key", "op"],
                                key=_pattern(LABEL_KEY_PATTERN),
                                op={"enum": ["exists", "not exists"]},
                                values={"type": ["array", "null"], "maxItems": 0},
                            ),
                        ]
                    }
                ),
                "maxItems": placement.MAX_EXPRESSIONS,
            },
            sites={**_list(_ID), "minItems": 1, "maxItems": placement.MAX_SITES},
            max_parallel={
                "type": "integer",
                "minimum": 1,
                "maximum": placement.MAX_PARALLEL,
                "default": placement.DEFAULT_MAX_PARALLEL,
            },
        ),
        "x-error": "bad_placement",
    },
    "AppRequest": _closed(
        ["spec"],
        spec={
            "oneOf": [{"type": "object"}, {"type": "string"}],
            "description": "the application spec (docs/app-spec.md) as JSON or YAML/JSON text",
            "x-error": "bad_spec",
        },
        placement=_ref("Placement"),
        tenant={**_ID, "x-error": "bad_tenant"},
    ),
    "SiteProgress": _obj(
        ["state", "message"],
        state={"enum": ["pending", "updating", "healthy", "failed"]},
        message=_STR,
    ),
    "Deployment": _obj(
        ["id", "app", "version", "digest", "state", "reason", "waves", "wave", "progress"],
        id=_STR,
        app=_ID,
        version=_STR,
        digest=_DIGEST,
        tenant=_ID,
        placement=_ref("Placement"),
        state={"enum": ["running", "succeeded", "failed", "superseded"]},
        reason=_STR,
        waves=_list(_list(_ID)),
        wave=_INT,
        wave_started_at=_NUM,
        created_at=_NUM,
        updated_at=_NUM,
        progress={"type": "object", "additionalProperties": _ref("SiteProgress")},
        deltas=_list(_INT),
    ),
    "AppSummary": _obj(
        ["name", "tenant", "version", "digest", "sites"],
        name=_ID,
        tenant=_ID,
        version=_STR,
        digest=_DIGEST,
        deployment={"type": ["object", "null"]},
        sites=_list(_ID),
    ),
    "AppList": _obj(["apps", "next_cursor"], apps=_list(_ref("AppSummary")), next_cursor=_CURSOR),
    "AppDetail": _obj(
        ["name", "spec", "placement", "deployment", "sites"],
        name=_ID,
        tenant=_ID,
        version=_STR,
        digest=_DIGEST,
        spec={"type": "object"},
        placement=_ref("Placement"),
        deployment={"oneOf": [_ref("Deployment"), {"type": "null"}]},
        sites={
            "type": "object",
            "additionalProperties": {
                "oneOf": [
                    _obj(["version", "state"], version=_STR, state=_STR, message=_STR),
                    {"type": "null"},
                ]
            },
        },
    ),
    "AppDeleted": _obj(
        ["deleted", "delta"], deleted=_ID, delta={"type": ["integer", "null"]}, sites=_list(_ID)
    ),
}

_SECURITY_SCHEMES = {
    "operatorToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "an operator token mht_<id>_<secret>; the operation says the least role",
    },
    "siteSignature": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Meshorch-Signature",
        "description": "Ed25519 signature of METHOD\\nPATH?QUERY\\nTIME\\nSHA256HEX(BODY) by "
        "the site's key, with X-Meshorch-Site and X-Meshorch-Time (docs/fleet-link.md)",
    },
}

_BASE64 = "([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?"
# The vault's shapes (central_hub.vault_api): secrets, lock-down, escrow.
_SECRET_SITE = _obj(
    ["state"], sent_version={"type": ["integer", "null"]}, delta={"type": ["integer", "null"]},
    site_version={"type": ["integer", "null"]}, state=_STR,
)  # fmt: skip
SCHEMAS.update(
    {
        "SecretRequest": {
            **_closed(
                ["name"], name={**_pattern(SECRET_NAME_PATTERN), "x-error": "bad_name"},
                value={"type": "string", "minLength": 1, "maxLength": MAX_SECRET_BYTES,
                       "description": f"UTF-8 text of 1 to {MAX_SECRET_BYTES} bytes",
                       "x-error": "bad_value"},
                value_b64={**_pattern(_BASE64, minLength=4,
                                      maxLength=(MAX_SECRET_BYTES + 2) // 3 * 4),
                           "x-error": "bad_value"},
                tenant={**_ID, "x-error": "bad_tenant"}, placement=_ref("Placement"),
            ),
            "oneOf": [{"required": ["value"]}, {"required": ["value_b64"]}],
            "x-error": "bad_value",
            "x-unknown-field-error": "bad_request",
        },
        "Secret": _obj(
            ["tenant", "name", "version"], tenant=_ID, name=_STR, version=_INT,
            placement={"type": "object"}, created_at=_NUM, updated_at=_NUM,
            targets=_list(_ID), sites={"type": "object", "additionalProperties": _SECRET_SITE},
        ),
        "SecretList": _obj(
            ["secrets", "next_cursor"], secrets=_list(_ref("Secret")), next_cursor=_CURSOR
        ),
        "SecretDeleted": _obj(
            ["deleted", "tenant"], deleted=_STR, tenant=_ID,
            delta={"type": ["integer", "null"]}, sites=_list(_ID),
        ),
        "SiteOp": _obj(["site", "op", "delta"], site=_ID, op=_STR, delta=_INT, locked_down=_BOOL),
        "UnsealApproval": _obj(
            ["site", "expires_at"], site=_ID, approved_at=_NUM, expires_at=_NUM, by=_STR
        ),
        "EscrowKey": _obj(
            ["public_key", "signature", "signed_by"], public_key=_HEX64, signature=_STR,
            signed_by=_HEX64, escrowed={"type": ["string", "null"]},
            unseal_approved=_BOOL, locked_down=_BOOL,
        ),
        "EscrowUpload": {
            **_obj(["sealed", "ssk_public"], sealed=_STR, ssk_public=_HEX64),
            "x-error": "bad_escrow",
        },
        "UnsealRequest": {
            **_closed(["public_key"], public_key={**_HEX64, "x-error": "bad_public_key"}),
            "x-unknown-field-error": "bad_request",
        },
        "SealedKey": _obj(["sealed_key"], sealed_key=_STR),
    }
)  # fmt: skip

# The fleet logs (central_hub.logs_api).
SCHEMAS.update(
    {
        "LogPage": _obj(
            ["logs", "next_cursor"],
            logs=_list(_obj(
                ["site", "stream", "seq", "time", "host", "text"], site=_ID, stream=_STR,
                seq=_INT, time=_NUM, level={"type": ["integer", "null"]}, host=_STR, text=_STR,
            )),
            next_cursor={"type": ["string", "null"]}, total={"type": ["integer", "null"]},
            truncated={"type": ["object", "null"], "description": "set when the query's "
                       "time budget was spent: reason, budget_s, blocks_scanned, blocks, "
                       "records_scanned"},
        ),
        "LogStreams": _obj(["streams"], streams=_list(_obj(
            ["site", "stream", "position", "dropped", "hub_dropped"], site=_ID, stream=_STR,
            position=_INT, dropped=_INT, hub_dropped=_INT,
        ))),
        "Alerts": _obj(["alerts"], alerts=_list(_obj(
            ["id", "kind", "site", "message", "since", "active", "acknowledged"], id=_STR,
            kind=_STR, site=_ID, message=_STR, since=_NUM, active=_BOOL, acknowledged=_BOOL,
        ))),
        "StreamPositions": _obj(
            ["positions"], positions={"type": "object", "additionalProperties": _INT},
            refused={"type": "object", "additionalProperties": _STR},
        ),
        "StreamPush": {**_closed(["streams"], streams={**_list(_closed(
            ["stream", "dropped_through", "chunks"],
            stream=_pattern(f"{ID_PATTERN}/{ID_PATTERN}/{ID_PATTERN}"), dropped_through=_INT,
            chunks=_list(_closed(
                ["first", "data"], first={"type": "integer", "minimum": 1},
                data={**_pattern(_BASE64), "description": "base64 of an encoded chunk "
                      "(meshorch.streams.model)"},
            )),
        )), "maxItems": MAX_PUSH_STREAMS}), "x-error": "bad_streams",
            "x-unknown-field-error": "bad_streams"},
    }
)  # fmt: skip

# The delta log's export (central_hub.deltas_api).
SCHEMAS["DeltaExport"] = _obj(
    ["fleet", "root_key", "head", "head_hash", "compacted", "envelopes", "next_after"],
    fleet=_STR, root_key=_HEX64, head=_INT, head_hash=_HEX64, compacted=_INT,
    site={"type": ["string", "null"]},
    envelopes=_list({"type": "string", "description": "an Envelope's JSON, byte for byte"}),
    next_after={"type": ["integer", "null"], "description": "after= of the next page; null "
                "at the head"},
)  # fmt: skip
_CAUSED = _list(_INT)  # the delta versions that cause a change
SCHEMAS["SitePending"] = _obj(
    ["site", "applied_version", "report_age_s", "stale", "head", "complete", "apps"],
    site=_ID, applied_version={"type": ["integer", "null"]}, report_age_s=_NULLABLE_NUM,
    stale=_BOOL, head=_INT, scanned_through=_INT, complete=_BOOL, snapshot_first=_BOOL,
    deltas_pending=_INT, deltas_for_site=_INT,
    apps=_list(_obj(["app", "change", "versions"], app=_STR, tenant={"type": ["string", "null"]},
                    change=_STR, versions=_CAUSED)),
    secrets=_list(_obj(["secret", "change", "versions"], secret=_STR, change=_STR,
                       versions=_CAUSED)),
    key_rotations=_CAUSED, root_rotations=_CAUSED, decommission=_CAUSED,
    lockdown={"type": ["object", "null"]}, agent_upgrade={"type": ["object", "null"]},
    quotas=_list({"type": "object"}), other_ops=_list({"type": "object"}),
    held={"type": ["object", "null"], "description": "since, by: the site is held"},
)  # fmt: skip
SCHEMAS["SiteHold"] = _obj(
    ["site", "held"], site=_ID,
    held={"type": ["object", "null"], "description": "since (unix seconds), by (token id); "
          "null: not held"},
)  # fmt: skip

_ERRORS = {
    "none": (400,),
    "enroll": (400, 403, 404, 409, 413),
    "site": (400, 401, 403, 404, 409, 413, 503),
}
# 429: failed authentications from the caller's address are rate-limited.
_TOKEN_ERRORS = (400, 401, 403, 404, 409, 413, 429)


def document(routes: Sequence[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__,
            "x-auth": route.auth,
            "responses": {
                **{str(code): _answer(route.response) for code in (route.status, *route.also)},
                **{
                    str(code): _answer("Error")
                    for code in (*_ERRORS.get(route.auth, _TOKEN_ERRORS), *route.errors)
                },
            },
        }
        if route.auth not in _ERRORS:
            operation["security"] = [{"operatorToken": []}]
            operation["x-action"] = authz.action_of(route.auth)
            operation["description"] = "Needs " + authz.requirement(route.auth) + "."
        elif route.auth == "site":
            operation["security"] = [{"siteSignature": []}]
        else:
            operation["security"] = []
        declared = {q.name: q for q in route.path_params}
        parameters = [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": declared[name].schema() if name in declared else _STR,
            }
            for name in re.findall(r"{(\w+)}", route.path)
        ]
        parameters += [
            {
                "name": q.name,
                "in": "query",
                "required": False,
                "schema": q.schema(),
                "description": q.description,
            }
            for q in route.query
        ]
        if parameters:
            operation["parameters"] = parameters
        if route.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _ref(route.request)}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "meshorch central hub",
            "version": "1",
            "description": "Operators declare applications and placement; sites fetch signed "
            "deltas over their own link (docs/fleet-link.md). " + PAGINATION,
        },
        "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": _SECURITY_SCHEMES},
    }


def _answer(schema: str) -> dict[str, Any]:
    return {
        "description": schema,
        "content": {"application/json": {"schema": _ref(schema)}},
    }
