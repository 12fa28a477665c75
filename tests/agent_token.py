"""The admin access token of every agent the tests start, and the headers that carry it.

Set in ``$MESHORCH_AGENT_TOKEN`` when the tests are collected, so the harnesses
(``LocalSite``, ``LabAgents``: their ``--operator-token-file``) and the command lines the
tests run (``meshorch ... --agent HOST:PORT``) all use it.
"""

from __future__ import annotations

import os
import secrets

from meshorch.site.access import TOKEN_ENV, AccessToken

TOKEN = (
    os.environ.get(TOKEN_ENV) or AccessToken(secrets.token_hex(8), secrets.token_bytes(32)).encode()
)
os.environ[TOKEN_ENV] = TOKEN
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
