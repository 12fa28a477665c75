"""Event streams: a durable event bus per site, replicated by Raft.

Modules: ``model`` (names, events, retention planning, chunk codec, pure), ``site`` (streams
appended through Raft and stored in LMDB), ``capture`` (instances' stdout and stderr into
``tenant/app/logs`` streams).

May import state and runtime, plus the foundation modules (``meshorch.errors``, ``sizes``,
``http_body``, ``http_metrics``) and raft, gossip, netmesh. Not its siblings (secrets,
images, join, releases) nor anything above.
"""
