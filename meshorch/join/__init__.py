"""Hosts joining a mesh site: tokens, admission, the WireGuard mesh of the members.

Modules: ``protocol`` (join tokens, proven requests, sealed and signed answers, pure),
``admission`` (the site side: issue tokens, admit and revoke hosts), ``mesh`` (bootstrap or
join before Raft starts; WireGuard peers kept equal to the members; mDNS advertising).

May import state and runtime, plus the foundation modules (``meshorch.errors``, ``sizes``,
``http_body``, ``http_metrics``) and raft, gossip, netmesh. Not its siblings (secrets,
images, streams, releases) nor anything above.
"""
