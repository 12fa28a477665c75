"""The ``meshorch`` command line: the agent, site and fleet commands, the only place that
configures logging.

Modules: ``main`` (the parser and the agent command), ``fleet`` (operator commands against
the hub), ``logs`` (fleet log search), ``secrets`` (site and secrets commands),
``agent_client`` (one blocking request to an agent).

The top layer: may import every other meshorch subpackage, plus the foundation modules
(``meshorch.errors``, ``sizes``, ``http_body``, ``http_metrics``) and raft, gossip, netmesh.
Not central_hub, which sits above meshorch, except ``meshorch hub`` running
``central_hub.cli`` (the one import the contract in pyproject.toml ignores).
"""
