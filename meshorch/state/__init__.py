"""The site's replicated state as the services see it.

Modules: ``tables`` (table names, key validation, member records, pure), ``protocol`` (site
protocol versions and features, pure), ``ports`` (the Protocols services are given:
``SiteState``, ``Members``), ``roster`` (``Roster``, the site's members and who answers).

May import runtime, plus the foundation modules (``meshorch.errors``, ``sizes``,
``http_body``, ``http_metrics``) and raft, gossip, netmesh. Nothing above it.
"""
