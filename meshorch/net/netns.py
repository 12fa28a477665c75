"""Open sockets inside a named network namespace (``ip netns add NAME``) from outside it.

A socket belongs to the namespace its creator was in when it was made, and keeps it
for life: made in another namespace, it can then be used from any thread of this one.
``setns()`` changes the calling thread only, so the switch happens in a throw-away
thread and no pool thread (nor the event loop's) is ever left in another namespace.
Needs CAP_SYS_ADMIN (root).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

NETNS_DIR = "/run/netns"
_CLONE_NEWNET = 0x40000000


def in_netns(netns: str, make: Callable[[], T]) -> T:
    """``make()`` run by a thread that entered ``netns``; its result, or what it raised."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            result.append(make())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


def _setns(fd: int) -> None:
    # os.setns arrived in Python 3.12; this project supports 3.11.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
