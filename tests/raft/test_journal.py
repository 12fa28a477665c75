"""The power-safe journal on a real file: what it syncs and when, the vote stored durably,
and a data directory that moves between durability modes."""

from pathlib import Path

from pysyncobj.journal import FileJournal
from pysyncobj.pickle import loads

from raft.journal import PREALLOCATE_BYTES, DurableJournal, _create_journal, register


def test_writes_are_synced_once_per_batch_and_only_when_something_changed(
    tmp_path: Path,
) -> None:
    journal = DurableJournal(str(tmp_path / "raft.journal"))
    journal.sync()
    assert journal.syncs == 0  # nothing written: no fdatasync
    for index in range(1, 6):
        journal.add(b"entry%d" % index, index, 1)
    journal.sync()
    journal.sync()
    assert journal.syncs == 1  # one for the batch
    journal.deleteEntriesFrom(3)
    journal.sync()
    assert journal.syncs == 2 and len(journal) == 3
    journal._destroy()


def test_the_term_and_vote_are_on_disk_before_the_call_returns(tmp_path: Path) -> None:
    journal = DurableJournal(str(tmp_path / "raft.journal"))
    journal.setCurrentTerm(7, "10.0.0.2:7800")
    meta = tmp_path / "raft.journal.meta"
    assert loads(meta.read_bytes()) == {"currentTerm": 7, "votedForNodeId": "10.0.0.2:7800"}
    assert not (tmp_path / "raft.journal.meta.tmp").exists()
    journal._destroy()


def test_a_journal_reads_the_same_in_both_modes(tmp_path: Path) -> None:
    path = tmp_path / "raft.journal"
    register(path, "power")
    durable = _create_journal(str(path))
    assert isinstance(durable, DurableJournal)
    durable.add(b"a", 1, 1)
    durable.add(b"b", 2, 1)
    durable.add(b"x", 3, 1)
    durable.deleteEntriesFrom(2)  # pysyncobj's truncation reads the records written
    durable.setCurrentTerm(3, None)
    durable._destroy()
    register(path, "process")
    plain = _create_journal(str(path))
    assert type(plain) is FileJournal
    assert [plain[i] for i in range(len(plain))] == [(b"a", 1, 1), (b"b", 2, 1)]
    assert plain.getCurrentTerm() == 3
    plain._destroy()


def test_entries_land_in_blocks_written_beforehand(tmp_path: Path) -> None:
    # A write into a hole makes fdatasync commit a block allocation too (a filesystem
    # journal commit): the file is written ahead of the entries instead, with zeros.
    path = tmp_path / "raft.journal"
    journal = DurableJournal(str(path))
    assert path.stat().st_size >= PREALLOCATE_BYTES
    assert path.stat().st_blocks * 512 >= path.stat().st_size  # no hole
    entry = b"e" * 1000
    count = PREALLOCATE_BYTES // len(entry) + 10  # past the first allocation
    for index in range(1, count + 1):
        journal.add(entry, index, 1)
    journal.sync()
    size = path.stat().st_size
    assert PREALLOCATE_BYTES < size <= 3 * PREALLOCATE_BYTES
    assert path.stat().st_blocks * 512 >= size
    journal._destroy()
    reopened = DurableJournal(str(path))  # the zeros past the last entry are not entries
    assert len(reopened) == count and reopened[count - 1] == (entry, count, 1)
    assert path.stat().st_blocks * 512 >= path.stat().st_size
    reopened._destroy()
    plain = FileJournal(str(path))  # and pysyncobj's own journal reads the file the same
    assert len(plain) == count
    plain._destroy()
