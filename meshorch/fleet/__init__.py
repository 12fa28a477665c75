"""The site's side of the fleet: the link to the hub, signed deltas, gossip, upgrades.

Modules: ``delta`` (signed deltas and their verification, pure; shared with the hub),
``apply`` (what verified deltas write, the site report, pure), ``records`` (the link's
records read), ``link_auth`` (signed site requests, pure), ``client`` (the HTTP client of
the hub), ``site_link`` (the leader's link session), ``gossip`` (the leader's gossip
member), ``forward`` (streams forwarded to the hub), ``escrow`` (the unseal key at the hub),
``upgrade`` (agent upgrades host by host), ``decommission``.

May import apps, secrets, images, streams, join, releases, state and runtime, plus the
foundation modules (``meshorch.errors``, ``sizes``, ``http_body``, ``http_metrics``) and
raft, gossip, netmesh. Not net (its sibling), site or anything above.
"""
