"""The site image store: content-addressed archives copied between the site's hosts.

Modules: ``store`` (blobs on disk, fetched from peers with resume and a sha256 check),
``service`` (uploads, the catalogue and holders in the replicated state, peer copies).

May import state and runtime, plus the foundation modules (``meshorch.errors``, ``sizes``,
``http_body``, ``http_metrics``) and raft, gossip, netmesh. Not its siblings (secrets,
streams, join, releases) nor anything above.
"""
