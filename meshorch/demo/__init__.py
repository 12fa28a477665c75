"""Showcases: a hub and three sites of real agents, on loopback or in the lab.

Modules: ``localsite`` (a site of agent processes on loopback), ``loopback`` (``meshorch
demo``), ``lab`` (``meshorch demo --lab``: namespaces, WireGuard, podman).

May import lab, site and every layer below it, plus the foundation modules
(``meshorch.errors``, ``sizes``, ``http_body``, ``http_metrics``) and raft, gossip, netmesh.
Not chaos (its sibling) nor cli.
"""
