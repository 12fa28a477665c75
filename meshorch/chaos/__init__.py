"""Chaos testing of a lab site: seeded faults (partitions, kills, pauses, power cuts, a
flapping uplink) under a recorded client workload, then invariants on what the clients saw
(linearizability of the KV store, acknowledged writes and events kept, the app healed).

Modules: ``scenarios`` (pure fault schedules), ``faults`` (injection on the lab),
``workload`` (the clients, run inside the lab), ``invariants`` (pure checks),
``report`` (JSON and SVG timeline), ``runner`` (all of it on one lab), ``cli``.
Kept import-light: the workload runs as ``python -m meshorch.chaos.workload``.

May import lab, site and every layer below them, the foundation modules and raft, gossip,
netmesh; not demo (its sibling) nor cli.
"""
