"""Application networking at a site: service DNS, the ingress address, tenant isolation.

Modules: ``services`` (endpoints and network rules, pure), ``dns_core`` (one query, one
decision, pure), ``dns`` (the DNS server on sockets), ``ingress`` (TCP forwarder), ``vip``
(a virtual IP moved by gratuitous ARP), ``netns`` (sockets in a namespace), ``app_network``
(all of it kept in step with the replicated state).

May import apps, secrets, images, streams, join, releases, state and runtime, plus the
foundation modules (``meshorch.errors``, ``sizes``, ``http_body``, ``http_metrics``) and
raft, gossip, netmesh. Not fleet (its sibling), site or anything above.
"""
