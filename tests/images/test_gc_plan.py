"""The garbage collection planner (pure): idle images, the grace period, pins, orphans,
and which copies a host under disk pressure gives up first."""

from __future__ import annotations

from meshorch.images.gc import LocalBlob, plan_catalogue, plan_host
from meshorch.images.store import OCI, ImageManifest

BASE = "sha256:" + "b" * 64


def blob(name: str) -> str:
    return "sha256:" + name * 64


def image(
    ref: str, unique: str, *, pinned: bool = False, added_at: float = 0.0, shared: bool = True
) -> ImageManifest:
    blobs = ((blob(unique), 100), *(((BASE, 1000),) if shared else ()))
    digest = blob(unique.upper() if unique.isdigit() else unique)
    return ImageManifest(
        ref, digest, sum(n for _, n in blobs), "h1", added_at, OCI, ref, blob(unique), blobs,
        pinned=pinned,
    )  # fmt: skip


WEB = image("reg/web:1", "1")
POS = image("reg/pos:1", "2", added_at=5.0)
TOOLS = image("reg/tools:1", "3", pinned=True)
USED = frozenset({"reg/pos:1", "reg/old:1"})


def test_an_image_no_app_names_is_idle_then_dropped_after_the_grace() -> None:
    first = plan_catalogue([WEB, POS, TOOLS], frozenset({"reg/pos:1"}), {}, 100.0, 60.0)
    assert first.mark_idle == ("reg/web:1",)  # the pinned one never becomes idle
    assert first.drop == () and first.clear_idle == ()
    during = plan_catalogue([WEB, POS, TOOLS], frozenset({"reg/pos:1"}), {"reg/web:1": 100.0},
                            159.0, 60.0)  # fmt: skip
    assert during.drop == () and during.mark_idle == ()
    after = plan_catalogue([WEB, POS, TOOLS], frozenset({"reg/pos:1"}), {"reg/web:1": 100.0},
                           160.0, 60.0)  # fmt: skip
    assert after.drop == (WEB,) and after.clear_idle == ("reg/web:1",)


def test_an_image_named_again_in_the_grace_is_kept_and_stale_idle_records_go() -> None:
    plan = plan_catalogue([WEB], frozenset({"reg/web:1"}), {"reg/web:1": 0.0, "gone:1": 0.0},
                          1e9, 60.0)  # fmt: skip
    assert plan.drop == () and set(plan.clear_idle) == {"reg/web:1", "gone:1"}


def test_orphan_blobs_go_after_the_grace_shared_ones_stay() -> None:
    local = {
        BASE: LocalBlob(1000, 0.0),
        blob("2"): LocalBlob(100, 0.0),
        blob("9"): LocalBlob(50, 0.0),  # listed by no image
        blob("8"): LocalBlob(70, 95.0),  # no image either, but new
        blob("7"): LocalBlob(30, 0.0),  # old, but of a pull under way
    }
    plan = plan_host(local, [POS], USED, {}, frozenset(), 100.0, 10.0, 0, frozenset({blob("7")}))
    assert plan.remove_blobs == (blob("9"),) and plan.freed_bytes == 50 and plan.evict == ()


def test_pressure_evicts_idle_images_first_then_the_oldest_used_elsewhere() -> None:
    old = image("reg/old:1", "4", added_at=1.0)
    local = {d: LocalBlob(n, 0.0) for i in (WEB, POS, TOOLS, old) for d, n in i.blob_sizes()}
    idle = {"reg/web:1": 50.0}
    # 100 B over: the idle image's own layer is enough; the base layer is shared, kept.
    plan = plan_host(local, [WEB, POS, TOOLS, old], USED, idle, frozenset(), 100.0, 1000.0, 100)
    assert plan.evict == (WEB,) and plan.remove_blobs == (blob("1"),)
    # 200 B over: then the image used elsewhere that came first (old), not the newer POS.
    plan = plan_host(local, [WEB, POS, TOOLS, old], USED, idle, frozenset(), 100.0, 1000.0, 200)
    assert plan.evict == (WEB, old) and plan.short_bytes == 0
    # Far over: everything but the pinned image and what runs here; the base layer stays
    # (TOOLS and POS list it).
    plan = plan_host(local, [WEB, POS, TOOLS, old], USED, idle, frozenset({"reg/pos:1"}), 100.0,
                     1000.0, 10_000)  # fmt: skip
    assert plan.evict == (WEB, old)
    assert set(plan.remove_blobs) == {blob("1"), blob("4")}
    assert plan.short_bytes == 10_000 - 200


def test_the_base_layer_goes_with_the_last_image_that_lists_it() -> None:
    web, pos = image("reg/web:1", "1"), image("reg/pos:1", "2")
    local = {d: LocalBlob(n, 0.0) for i in (web, pos) for d, n in i.blob_sizes()}
    idle = {"reg/web:1": 1.0, "reg/pos:1": 2.0}
    plan = plan_host(local, [web, pos], frozenset(), idle, frozenset(), 100.0, 1000.0, 1100)
    assert plan.evict == (web, pos)
    assert set(plan.remove_blobs) == {blob("1"), blob("2"), BASE} and plan.freed_bytes == 1200


def test_an_image_no_app_names_goes_first_even_before_it_is_recorded_idle() -> None:
    fresh = image("reg/fresh:1", "5", added_at=50.0)
    local = {d: LocalBlob(n, 0.0) for i in (POS, fresh) for d, n in i.blob_sizes()}
    plan = plan_host(local, [POS, fresh], USED, {}, frozenset(), 100.0, 1000.0, 1)
    assert plan.evict == (fresh,)


def test_nothing_to_give_up_under_no_pressure() -> None:
    local = {d: LocalBlob(n, 0.0) for d, n in WEB.blob_sizes()}
    plan = plan_host(local, [WEB], frozenset(), {"reg/web:1": 0.0}, frozenset(), 1e9, 10.0, 0)
    assert plan.remove_blobs == () and plan.evict == ()
