"""Hypothesis strategies for application specs, hosts and placements."""

from __future__ import annotations

from hypothesis import strategies as st

from meshorch.apps.scheduler import HostInfo
from meshorch.apps.spec import (
    AppSpec,
    ConfigFile,
    Constraint,
    ContainerSpec,
    ExecCheck,
    HttpCheck,
    PortSpec,
    Probe,
    Probes,
    Resources,
    RestartPolicy,
    ServiceSpec,
    TcpCheck,
)

MI = 2**20
LABELS = {"zone": ("a", "b", "c"), "disk": ("ssd", "hdd"), "gpu": ("yes",)}

names = st.from_regex(r"[a-z][a-z0-9-]{0,6}[a-z0-9]", fullmatch=True)
label_keys = st.sampled_from(sorted(LABELS))


@st.composite
def constraints(draw: st.DrawFn) -> Constraint:
    label = draw(label_keys)
    op = draw(st.sampled_from(["in", "not_in", "exists", "equals"]))
    if op == "exists":
        return Constraint(label, "exists")
    if op == "equals":
        return Constraint(label, "equals", (draw(st.sampled_from(LABELS[label])),))
    values = draw(st.lists(st.sampled_from(LABELS[label]), min_size=1, max_size=2, unique=True))
    return Constraint(label, "in" if op == "in" else "not_in", tuple(values))


@st.composite
def resources(draw: st.DrawFn) -> Resources:
    cpu_request = draw(st.integers(0, 15)) * 100
    cpu_limit = draw(st.none() | st.integers(max(cpu_request, 1), 4000))
    memory_limit = draw(st.integers(1, 16)) * 64 * MI
    memory_request = draw(st.integers(0, memory_limit // (64 * MI))) * 64 * MI
    return Resources(cpu_request, cpu_limit, memory_request, memory_limit)


checks = st.one_of(
    st.builds(HttpCheck, st.integers(1, 65535), st.sampled_from(["/", "/healthz"])),
    st.builds(TcpCheck, st.integers(1, 65535)),
    st.builds(ExecCheck, st.lists(st.text(max_size=5), min_size=1, max_size=3).map(tuple)),
)


@st.composite
def probes(draw: st.DrawFn) -> Probe:
    period = draw(st.integers(1, 60).map(float))
    return Probe(
        draw(checks),
        period,
        draw(st.floats(0.1, period)),
        draw(st.integers(1, 10)),
        draw(st.floats(0, 100)),
    )


@st.composite
def containers(draw: st.DrawFn, name: str) -> ContainerSpec:
    env = draw(st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,5}", fullmatch=True), st.text()))
    ports = draw(
        st.lists(
            st.builds(PortSpec, st.integers(1, 65535), st.sampled_from(["tcp", "udp"])),
            max_size=2,
            unique=True,
        )
    )
    files = draw(
        st.lists(
            st.builds(ConfigFile, st.sampled_from(["/etc/a", "/etc/b/c.conf"]), st.text()),
            max_size=2,
            unique_by=lambda f: f.path,
        )
    )
    return ContainerSpec(
        name,
        draw(st.sampled_from(["busybox", "localhost/app:1.0", "x@sha256:" + "ab" * 32])),
        draw(resources()),
        tuple(draw(st.lists(st.text(max_size=8), max_size=3))),
        tuple(sorted(env.items())),
        tuple(ports),
        tuple(files),
        Probes(*(draw(st.none() | probes()) for _ in range(3))),
    )


@st.composite
def services(draw: st.DrawFn, name: str) -> ServiceSpec:
    container_names = draw(st.lists(names, min_size=1, max_size=2, unique=True))
    initial = draw(st.floats(0.1, 10))
    return ServiceSpec(
        name,
        tuple(draw(containers(n)) for n in container_names),
        draw(st.none() | st.integers(0, 5)),
        RestartPolicy(
            draw(st.sampled_from(["always", "on-failure", "never"])),
            initial,
            draw(st.floats(initial, 600)),
        ),
        tuple(draw(st.lists(constraints(), max_size=2))),
        draw(st.booleans()),
    )


@st.composite
def app_specs(draw: st.DrawFn, name: str | None = None) -> AppSpec:
    service_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    return AppSpec(
        name or draw(names),
        draw(st.from_regex(r"[0-9][0-9a-z.+-]{0,6}", fullmatch=True)),
        tuple(draw(services(n)) for n in service_names),
    )


@st.composite
def lean_services(draw: st.DrawFn, name: str) -> ServiceSpec:
    """A service with only what the scheduler reads: fast to draw, easy to shrink."""
    container = ContainerSpec("main", "busybox", draw(resources()))
    return ServiceSpec(
        name,
        (container,),
        draw(st.none() | st.integers(0, 5)),
        constraints=tuple(draw(st.lists(constraints(), max_size=2))),
        anti_affinity=draw(st.booleans()),
    )


@st.composite
def app_lists(draw: st.DrawFn) -> list[AppSpec]:
    """One to three apps of one to three lean services each, for the scheduler."""
    apps = []
    for app_name in draw(st.lists(st.sampled_from("abc"), min_size=1, max_size=3, unique=True)):
        service_names = draw(
            st.lists(st.sampled_from(["web", "db", "agent"]), min_size=1, max_size=3, unique=True)
        )
        services = tuple(draw(lean_services(n)) for n in service_names)
        apps.append(AppSpec(app_name, "1", services))
    return apps


@st.composite
def host_lists(draw: st.DrawFn) -> list[HostInfo]:
    count = draw(st.integers(0, 6))
    hosts = []
    for i in range(count):
        labels = {
            key: draw(st.sampled_from(values))
            for key, values in LABELS.items()
            if draw(st.booleans())
        }
        hosts.append(
            HostInfo(
                f"h{i}",
                labels,
                draw(st.sampled_from([0, 500, 1000, 2000, 4000])),
                draw(st.integers(0, 32)) * 64 * MI,
                draw(st.booleans() | st.just(True)),
            )
        )
    return hosts
