"""Sealed secrets at a site: the key hierarchy in the replicated state, keys in memory.

Modules: ``keyring`` (keys, records and the plans that change them, pure), ``service`` (the
agent's side: unseal, serve peers, rotate, lock down, secret files for instances).

May import state and runtime, plus the foundation modules (``meshorch.errors``, ``sizes``,
``http_body``, ``http_metrics``) and raft, gossip, netmesh. Not its siblings (images,
streams, join, releases) nor anything above.
"""
