"""pysyncobj's TCP transport with a cap on the size of the messages it buffers.

pysyncobj frames each message with a 4-byte length (``struct 'i'``) and its
connection (``pysyncobj.tcp_connection.TcpConnection``) reads whatever the
socket holds into one ``bytes`` buffer, grown with ``+=``, before it looks at
the length; only a complete message is decrypted, which is where the password
is checked. Anyone who can reach the Raft port can therefore announce a 2 GiB
message and send junk: the buffer grows without bound on the event loop, each
read copying all of it again.

``CappedTransport`` is pysyncobj's ``TCPTransport`` (handed to ``SyncObj`` as
its ``transportClass``) whose connections are ``CappedTcpConnection``: after
each read, the length of the first buffered message is checked, and the
connection is dropped at once when it announces more than

* ``handshake_bytes`` (a few KiB) while the peer has not proved it knows the
  password: until it sent one message that decrypted (its random key,
  ``sendRandKey``; an encrypted connection carries nothing else before);
* ``message_bytes`` afterwards: room for the largest append-entries message
  (a batch of ``appendEntriesBatchSizeBytes`` plus one entry of
  ``max_entry_bytes``), encrypted.

Reading also stops once the first buffered message is complete, so that it is
parsed before more is read: the buffer never holds more than one message and
one read (``recvBufferSize``). The check costs a few operations per read.

The transport also

* closes an incoming connection that has not said which member it is within
  ``IDENTIFY_S`` (pysyncobj times a connection out only when it sends to it), and keeps at
  most ``MAX_UNKNOWN_CONNECTIONS`` such connections at once;
* refuses pysyncobj's utility commands (status, add or remove a member, hand over
  leadership) and read-only followers, which meshorch does not use: the password alone
  must not open them;
* calls ``before_send`` before any message leaves but a leader's appends
  (``raft.journal``: the journal is fdatasync'd first when writes must survive a power
  cut; ``unsynced_send_allowed`` says why a leader's appends need not wait).

The patch is narrow: it overrides ``TcpConnection.__processRead`` (the
recv step, name-mangled ``_TcpConnection__processRead``) and nothing else, and
the transport re-classes the connections it is handed (incoming ones from
``TcpServer``, outgoing ones from ``addNode``) before any byte is read. It is
written against pysyncobj 0.3.x.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from typing import Any

from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.transport import TCPTransport

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("i")  # pysyncobj's framing: native byte order, signed
# The first message of an encrypted connection is a pickled 32-byte random key,
# compressed and encrypted: about 150 bytes.
HANDSHAKE_MESSAGE_BYTES = 4096
# An incoming connection has this long to say which member it is (key exchange, then its
# address: milliseconds for a member), and there may be this many such at once.
IDENTIFY_S = 5.0
MAX_UNKNOWN_CONNECTIONS = 64


def message_cap(max_entry_bytes: int, append_batch_bytes: int) -> int:
    """The largest message an authenticated peer sends: the entries of one append
    (up to ``append_batch_bytes``, plus the entry that crosses it), pickled,
    compressed (incompressible data grows a little) and encrypted (base64: 4/3)."""
    return 2 * (append_batch_bytes + max_entry_bytes) + (1 << 20)


# What a leader sends that vouches for nothing of its own journal: its appends (the
# entries go to the followers while its own fdatasync runs, as the Raft dissertation allows,
# section 10.2.1) and the index it gave a follower's forwarded command.
_UNSYNCED_TYPES = frozenset({"append_entries", "apply_command_response"})


def unsynced_send_allowed(message: Any) -> bool:
    """May ``message`` leave before this member's journal is on disk?

    A leader's append carries entries and its commit index. The entries need not be on the
    leader's disk: the leader counts itself towards a commit only in the tick after it
    appended them, and every tick ends with an fdatasync (``raft.node``), so the commit
    index it sends, and any acknowledgement to a client, never covers an entry only in its
    page cache. Everything else (a follower's answer, a vote, a request for one) reflects
    this member's journal and waits for it."""
    return isinstance(message, dict) and message.get("type") in _UNSYNCED_TYPES


class CappedTcpConnection(TcpConnection):  # type: ignore[misc]
    """A ``TcpConnection`` that drops its peer when a message is announced too large."""

    handshake_bytes = HANDSHAKE_MESSAGE_BYTES
    message_bytes = HANDSHAKE_MESSAGE_BYTES

    def _TcpConnection__processRead(self) -> bool:
        if not TcpConnection._TcpConnection__processRead(self):
            return False
        buffer: bytes = self._TcpConnection__readBuffer
        size = len(buffer)
        if size < _LENGTH.size:
            return True
        length: int = _LENGTH.unpack_from(buffer)[0]
        trusted = self.encryptor is None or self.sendRandKey is not None
        cap = self.message_bytes if trusted else self.handshake_bytes
        if not 0 <= length <= cap:
            logger.warning(
                "raft: dropped a connection announcing a %d-byte message (limit %d%s)",
                length,
                cap,
                "" if trusted else ", before authentication",
            )
            self.disconnect()
            return False
        # Stop reading once the first message is complete: it is parsed first.
        return size < _LENGTH.size + length


class CappedTransport(TCPTransport):  # type: ignore[misc]
    """``TCPTransport`` whose connections are ``CappedTcpConnection``s.

    Built by ``SyncObj`` as ``transportClass(syncObj, selfNode, otherNodes)``:
    bind the cap first, e.g. ``functools.partial(CappedTransport, message_bytes=...)``.
    """

    def __init__(
        self,
        *args: Any,
        message_bytes: int,
        before_send: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        self._message_bytes = message_bytes
        self._before_send = before_send
        self._accepted_at: dict[TcpConnection, float] = {}  # incoming, not yet identified
        super().__init__(*args, **kwargs)  # adds the partners: connections are made

    def send(self, node: Any, message: Any) -> bool:
        # Every Raft message (an append, its answer, a vote) goes out here: what it
        # vouches for must be on disk first (raft.journal.DurableJournal.sync), except
        # what only a leader sends: see ``unsynced_send_allowed``.
        if self._before_send is not None and not unsynced_send_allowed(message):
            self._before_send()
        sent: bool = super().send(node, message)
        return sent

    def _cap(self, conn: TcpConnection) -> None:
        conn.__class__ = CappedTcpConnection
        conn.message_bytes = self._message_bytes

    def _onNewIncomingConnection(self, conn: TcpConnection) -> None:
        self._cap(conn)  # accepted a moment ago: nothing read yet
        if len(self._unknownConnections) >= MAX_UNKNOWN_CONNECTIONS:
            # Strangers holding connections open must not exhaust the descriptors.
            logger.warning(
                "raft: %d connections not yet identified; dropped one more", MAX_UNKNOWN_CONNECTIONS
            )
            conn.disconnect()
            return
        self._accepted_at[conn] = time.monotonic()
        super()._onNewIncomingConnection(conn)

    def _onIncomingMessageReceived(self, conn: TcpConnection, message: Any) -> None:
        if conn.sendRandKey and (isinstance(message, list) or message == "readonly"):
            # After the key exchange: pysyncobj's admin commands (add or remove members,
            # hand over leadership) and read-only followers (the whole log). meshorch uses
            # neither, and knowing the password must not be enough for them.
            logger.warning("raft: refused a utility or read-only connection")
            self._unknownConnections.discard(conn)
            conn.disconnect()
            return
        super()._onIncomingMessageReceived(conn, message)

    def _onTick(self) -> None:
        super()._onTick()
        self._drop_silent_strangers(time.monotonic())

    def _drop_silent_strangers(self, now: float) -> None:
        """Incoming connections that have not said which member they are within
        ``IDENTIFY_S`` are closed (pysyncobj times a connection out only when it sends
        to it, and it never sends to a connection that said nothing)."""
        accepted = self._accepted_at
        for conn in [c for c in accepted if c not in self._unknownConnections]:
            del accepted[conn]  # identified, or gone
        for conn, at in list(accepted.items()):
            if now - at > IDENTIFY_S:
                del accepted[conn]
                conn.disconnect()

    def addNode(self, node: Any) -> None:
        super().addNode(node)
        conn = self._connections.get(node)
        if conn is not None and not isinstance(conn, CappedTcpConnection):
            self._cap(conn)  # created disconnected: it connects on a later tick
