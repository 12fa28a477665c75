"""Agent releases: wheels installed side by side, and a launcher that tries a new one.

Modules: ``wheels`` (inspect, install, build test releases), ``launcher`` (start an upgraded
agent on trial, roll back by itself).

May import state and runtime, plus the foundation modules (``meshorch.errors``, ``sizes``,
``http_body``, ``http_metrics``) and raft, gossip, netmesh. Not its siblings (secrets,
images, streams, join) nor anything above.
"""
