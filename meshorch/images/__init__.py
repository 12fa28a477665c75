"""The site image store: content-addressed blobs copied between the site's hosts.

Modules: ``store`` (blobs on disk, fetched with resume and a sha256 check; catalogue
records), ``service`` (uploads, registry pulls pinned to a digest, the catalogue and holders
in the replicated state, peer copies), ``reference`` and ``oci`` (image references,
manifests, platforms, auth challenges: pure), ``registry`` (the OCI distribution API
client), ``pull`` (a pull into the store; the OCI layout podman loads).

May import state and runtime, plus the foundation modules (``meshorch.errors``, ``sizes``,
``http_body``, ``http_metrics``) and raft, gossip, netmesh. Not its siblings (secrets,
streams, join, releases) nor anything above.
"""
