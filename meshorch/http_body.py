"""Reading HTTP bodies with a size limit."""

from __future__ import annotations

import aiohttp


async def read_limited(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, or its first ``limit + 1`` bytes when it is larger (callers refuse those).

    ``StreamReader.read(n)`` returns what has arrived so far, up to ``n``: one call can
    cut a large body short, so read until the end or past the limit.
    """
    parts: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.read(limit + 1 - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)
