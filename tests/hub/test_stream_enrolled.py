"""The link's per-report reads of a site's record, on a real LMDB store: the report
stream's enrolled check (``report_stream.enrolled_with``) and a site's key and hold
(``holds.SiteFacts``): no read while the sites table is unchanged, the record read again
after any change to it, and a changed key, a hold, a release or a deletion seen at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from central_hub.deltalog import Head
from central_hub.holds import SiteFacts
from central_hub.ledger import Ledger
from central_hub.report_stream import enrolled_with
from central_hub.store import Store, delete, put_json


class CountingStore(Store):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads = 0

    def get_json(self, db: str, key: str) -> Any:
        self.reads += 1
        return super().get_json(db, key)


def test_the_check_reads_the_site_only_after_the_sites_table_changed(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "store")
    store.commit([put_json("sites", "shop-1", {"public_key": "aa"})], sync=False)
    enrolled = enrolled_with(store, "shop-1", "aa")
    assert enrolled() and store.reads == 1
    for _ in range(5):
        assert enrolled()
    assert store.reads == 1  # the table did not change: no read
    store.commit([put_json("tenants", "t1", {})], sync=False)  # another table
    assert enrolled() and store.reads == 1
    store.commit([put_json("sites", "shop-2", {"public_key": "bb"})], sync=False)
    assert enrolled() and store.reads == 2  # the table changed: read again, still enrolled
    store.commit([put_json("sites", "shop-1", {"public_key": "cc"})], sync=False)
    assert not enrolled()  # a new key: the stream signed with the old one is refused
    assert not enrolled() and store.reads == 4  # a refusal is never cached
    store.commit([delete("sites", "shop-1")], sync=False)
    assert not enrolled_with(store, "shop-1", "cc")()
    store.close()


def test_site_facts_read_the_record_only_after_the_sites_table_changed(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "store")
    store.commit([put_json("sites", "shop-1", {"public_key": "aa"})], sync=False)
    ledger = Ledger(tmp_path, lambda: 0.0, delta_ttl_s=3600.0)
    facts = SiteFacts(ledger)
    assert facts.of("shop-1") == (None, False) and store.reads == 0  # not open: no read
    ledger.attach(store, "fleet", [], Head())
    for _ in range(5):
        assert facts.of("shop-1") == ("aa", False)
    assert store.reads == 1
    store.commit([put_json("reports", "shop-1", {})], sync=False)  # another table
    assert not facts.is_held("shop-1") and store.reads == 1
    store.commit([put_json("sites", "shop-1", {"public_key": "aa", "held": {"at": 1}})], sync=False)
    assert facts.is_held("shop-1") and store.reads == 2  # a hold: seen at once
    assert facts.is_held("shop-1") and store.reads == 2
    store.commit([put_json("sites", "shop-1", {"public_key": "bb"})], sync=False)
    assert facts.of("shop-1") == ("bb", False)  # released, with a new key
    assert facts.of("nobody") == (None, False) and facts.of("nobody") == (None, False)
    assert store.reads == 5  # an unknown site is read each time, never kept
    store.commit([delete("sites", "shop-1")], sync=False)
    assert facts.of("shop-1") == (None, False)
    store.close()
