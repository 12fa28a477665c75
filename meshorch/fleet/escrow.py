"""The site's end of the hub's escrow of its unseal key (docs/secrets.md, "Hub side").

Run by the site leader's fleet link session (``meshorch.fleet.site_link``). Every
``POLL_S`` it asks the hub for its escrow key (``GET /v1/link/escrow-key``), checks the
key's signature against the root keys the site trusts, and then:

- **unsealed and not locked down**: when the hub does not hold this site's unseal key for
  its current secrets key (``escrowed`` differs from the site's public key), uploads the
  KEK sealed to the escrow key (``POST /v1/link/escrow``);
- **sealed and not locked down**, while the hub says an operator approved an unseal: asks
  for the KEK sealed to a fresh ephemeral key (``POST /v1/link/unseal``) and unseals
  through the local unseal path (``SiteSecrets.unseal``: the KEK must open the SSK); the
  other hosts then get it from this one.

A locked-down site does neither (the hub refuses both too).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from nacl.exceptions import BadSignatureError
from nacl.public import PrivateKey
from nacl.signing import VerifyKey

from meshorch.errors import RemoteInputError
from meshorch.fleet.client import LinkClient, LinkError, LinkRefused
from meshorch.secrets.keyring import KEY_BYTES, SEAL_OVERHEAD, Tampered, b64, open_sealed
from meshorch.secrets.service import SiteSecrets

logger = logging.getLogger(__name__)

POLL_S = 1.0  # while sealed (waiting for an approval) or something is to be done
IDLE_POLL_S = 30.0  # escrowed and unsealed: only to notice a hub that lost the key
ESCROW_MESSAGE_PREFIX = b"meshorch-escrow-key\n"


def escrow_message(public_hex: str) -> bytes:
    """What the fleet root key signs to vouch for the hub's escrow key."""
    return ESCROW_MESSAGE_PREFIX + public_hex.encode()


def verify_escrow_key(answer: dict[str, Any], trusted: Iterable[str]) -> bytes:
    """The escrow public key of a ``GET /v1/link/escrow-key`` answer when one of the
    ``trusted`` root keys signed it; raises RemoteInputError ``bad_escrow_key``."""
    public, signature, signed_by = (
        answer.get("public_key"),
        answer.get("signature"),
        answer.get("signed_by"),
    )
    if not (
        isinstance(public, str)
        and isinstance(signature, str)
        and isinstance(signed_by, str)
        and signed_by in set(trusted)
        and len(public) == 64
    ):
        raise RemoteInputError("bad_escrow_key", "the escrow key is not signed by a trusted key")
    try:
        VerifyKey(bytes.fromhex(signed_by)).verify(escrow_message(public), bytes.fromhex(signature))
        return bytes.fromhex(public)
    except (BadSignatureError, ValueError) as exc:
        raise RemoteInputError("bad_escrow_key", f"the escrow key's signature: {exc}") from None


class EnrolledLink(Protocol):
    """What escrow needs of the link session (``meshorch.fleet.site_link.SiteLink``)."""

    async def wait_enrolled(self) -> None: ...

    def trusted_keys(self) -> frozenset[str]: ...


class SiteEscrow:
    """One leader session's escrow duty (``run`` until cancelled)."""

    def __init__(self, link: EnrolledLink, secrets: SiteSecrets, client: LinkClient) -> None:
        self.link = link
        self.secrets = secrets
        self.client = client
        self.uploaded: str | None = None  # the secrets public key the hub holds the KEK of

    async def run(self) -> None:
        await self.link.wait_enrolled()
        while True:
            delay_s = POLL_S
            try:
                delay_s = await self.step()
            except LinkError as exc:
                logger.debug("escrow: %s", exc)
            except RemoteInputError as exc:
                logger.warning("escrow: %s", exc)
            await self._wait(delay_s)

    async def _wait(self, delay_s: float) -> None:
        """Sleep ``delay_s``, but look again within POLL_S once this host is sealed or
        locked down (an unseal approval must not wait for the idle period), or the site's
        key changed (a rekey: the hub's escrow must hold the new unseal key at once)."""
        secrets = self.secrets
        waited = 0.0
        while waited < delay_s:
            await asyncio.sleep(POLL_S)
            waited += POLL_S
            if secrets.sealed or secrets.locked_down() or secrets.public_key_hex() != self.uploaded:
                return

    async def step(self) -> float:
        """One look at the escrow; returns how long to wait before the next one (a
        thousand idle sites must not poll the hub every second)."""
        secrets = self.secrets
        ssk = secrets.public_key_hex()
        if ssk is None or secrets.locked_down():
            return POLL_S  # local state only: no request to the hub
        answer = await self.client.escrow_key()
        escrow_key = verify_escrow_key(answer, self.link.trusted_keys())
        if answer.get("locked_down") is True:
            return POLL_S
        if not secrets.sealed:
            if answer.get("escrowed") != ssk:
                blob = secrets.escrow(escrow_key)
                await self.client.escrow(b64(blob), ssk)
                logger.info("escrow: the hub holds this site's unseal key")
            self.uploaded = ssk
            return IDLE_POLL_S
        if answer.get("unseal_approved") is True:
            await self._unseal_from_hub()
        return POLL_S

    async def _unseal_from_hub(self) -> None:
        mine = PrivateKey.generate()
        try:
            sealed = await self.client.unseal(bytes(mine.public_key).hex())
        except LinkRefused as exc:
            logger.warning("escrow: the hub refused to unseal: %s", exc)
            return
        try:
            blob = base64.b64decode(sealed.encode(), validate=True)
            if len(blob) != KEY_BYTES + SEAL_OVERHEAD:
                raise ValueError("not a sealed key")
            kek = open_sealed(mine, blob)
        except (binascii.Error, ValueError, Tampered) as exc:
            logger.warning("escrow: a bad unseal answer from the hub: %s", exc)
            return
        if await self.secrets.unseal(kek):
            logger.info("escrow: unsealed with the key the hub held")
