"""The report stream's per-message enrolled check (``report_stream.enrolled_with``) on a
real LMDB store: no read while the sites table is unchanged, the key checked again after
any change to it, and a changed or deleted key refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
