"""Run inside a lab host: send one hand-made join request, print the answer.

    python join_probe.py URL SITE TOKEN_ID SECRET_B64URL HOST_ID [TIMESTAMP_OFFSET_S]

Prints ``STATUS CODE`` (CODE is the error code, or ``ok``).
"""

import base64
import secrets
import sys
import time
import urllib.error
import urllib.request

import orjson

from meshorch.join.protocol import JoinRequest
from netmesh import generate_keypair


def main() -> None:
    url, site, token_id, secret_b64, host_id = sys.argv[1:6]
    offset_s = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    secret = base64.urlsafe_b64decode(secret_b64 + "=" * (-len(secret_b64) % 4))
    request = JoinRequest(
        site=site,
        token_id=token_id,
        host_id=host_id,
        wg_public_key=generate_keypair().public_key_b64,
        wg_endpoint="10.1.0.250:51820",
        api="10.1.0.250:7700",
        timestamp=time.time() + offset_s,
        nonce=secrets.token_hex(8),
    ).with_proof(secret)
    http = urllib.request.Request(url, data=orjson.dumps(request.to_json()), method="POST")
    try:
        with urllib.request.urlopen(http, timeout=20) as response:
            print(response.status, "ok")
    except urllib.error.HTTPError as exc:
        print(exc.code, orjson.loads(exc.read())["error"]["code"])


if __name__ == "__main__":
    main()
