"""The agent, one per host: the one place that wires the services, and its HTTP API.

Modules: ``agent`` (builds Raft, the roster and every service, hands each what it uses),
``config`` (flags to ``AgentConfig``, the cluster password), ``api`` (the agent's HTTP API),
``host_api`` and ``stream_api`` (host and stream routes), ``metrics``.

May import fleet, net, apps, secrets, images, streams, join, releases, state and runtime,
plus the foundation modules (``meshorch.errors``, ``sizes``, ``http_body``,
``http_metrics``) and raft, gossip, netmesh. Not lab, demo, chaos or cli.
"""
