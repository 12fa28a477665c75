"""Applications at a site: specs, their records in the replicated state, placement and upkeep.

Modules: ``spec`` (parse, validate, canonical JSON), ``records`` (the ``apps`` table),
``quotas`` (tenant quotas, pure), ``scheduler`` and ``rollout`` (pure cores), ``controller``
(the leader's loop), ``reconciler`` (each host's runtime kept to its placements), ``health``
(probes, restart back-off), ``pressure`` (shedding work under disk or memory pressure),
``resources`` and ``settings`` (what a host uses and offers).

May import secrets, images, streams, join, releases, state and runtime, plus the foundation
modules (``meshorch.errors``, ``sizes``, ``http_body``, ``http_metrics``) and raft, gossip,
netmesh. Never site, fleet, net or anything above: services get their collaborators
(``meshorch.state.ports``) from the agent.
"""
