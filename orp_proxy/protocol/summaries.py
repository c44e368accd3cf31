"""Compaction summaries: sealed into opaque `encrypted_content` blobs, replayed from them.

`POST /v1/responses/compact` hands the client its summary inside a `compaction` item whose
`encrypted_content` only this deployment can open: Fernet (AES-128-CBC + HMAC-SHA256, from the
`cryptography` package) under a key derived with HKDF-SHA256 from `ORP_COMPACTION_KEY`, or, when
that is unset, from the store's owner-hash key (so every worker of one deployment agrees without
configuration). The sealed payload names the owner it was made for; another owner's request cannot
open it, so a leaked blob cannot be turned back into text through someone else's credential.

When a request's context contains a `compaction` item, `replay_compactions` puts a user message
carrying the summary in its place. A user message, not a system one: the summary is model-written
text derived from user-supplied content, and must not gain the authority of instructions.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ujson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from orp_proxy.config import ConfigError
from orp_proxy.errors import ApiError

MIN_KEY_LENGTH = 32
SUMMARY_PREFIX = "Summary of the earlier conversation:\n\n"

_FORMAT = 1
_HKDF_INFO = b"orp compaction summary v1"
# A label no HTTP client can present as its bearer token (header values cannot contain NUL), so
# the store's keyed hash of it is a key no owner id can ever equal.
_DERIVATION_LABEL = "\x00orp:compaction-key:v1"


class SealedSummaryError(ValueError):
    """A blob that does not open: tampered, truncated, another deployment's, or another owner's."""


def _fernet(secret: bytes) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(secret)
    return Fernet(base64.urlsafe_b64encode(key))


class CompactionCipher:
    """Seals and opens compaction summaries; the first key seals, every key opens (rotation)."""

    def __init__(self, secrets: Sequence[bytes]) -> None:
        if not secrets:
            raise ValueError("at least one key is needed")
        self._box = MultiFernet([_fernet(secret) for secret in secrets])

    @classmethod
    def create(cls, configured: str | None, owner_id: Callable[[str | None], str]
               ) -> CompactionCipher:
        """From `ORP_COMPACTION_KEY` (comma-separated keys), or derived from the store's key
        (`owner_id`: the store's keyed hash of a credential)."""
        if configured is None:
            return cls([owner_id(_DERIVATION_LABEL).encode()])
        keys = [key.strip() for key in configured.split(",") if key.strip()]
        if not keys:
            raise ConfigError("ORP_COMPACTION_KEY=<redacted>: no key given")
        for key in keys:
            if len(key) < MIN_KEY_LENGTH:
                raise ConfigError(f"ORP_COMPACTION_KEY=<redacted>: each key needs at least "
                                  f"{MIN_KEY_LENGTH} characters (e.g. `openssl rand -base64 32`)")
        return cls([key.encode() for key in keys])

    def seal(self, owner: str, summary: str) -> str:
        payload = ujson.dumps({"v": _FORMAT, "owner": owner, "summary": summary},
                              ensure_ascii=True, escape_forward_slashes=False)
        return self._box.encrypt(payload.encode()).decode("ascii")

    def open(self, owner: str, blob: str) -> str:
        """The summary sealed in `blob` for `owner`; `SealedSummaryError` otherwise."""
        try:
            payload = ujson.loads(self._box.decrypt(blob.encode("utf-8", "surrogatepass")))
        except (InvalidToken, ValueError, TypeError):
            raise SealedSummaryError("the blob does not open with this deployment's keys"
                                     ) from None
        if (not isinstance(payload, dict) or payload.get("v") != _FORMAT
                or payload.get("owner") != owner or not isinstance(payload.get("summary"), str)):
            raise SealedSummaryError("the blob was not made for this caller")
        summary: str = payload["summary"]
        return summary


def summary_message(summary: str) -> dict[str, Any]:
    """The input item that stands in for a compaction item when the context goes upstream."""
    return {"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": SUMMARY_PREFIX + summary}]}


def _replay(cipher: CompactionCipher, owner: str, item: Mapping[str, Any], param: str
            ) -> dict[str, Any]:
    try:
        return summary_message(cipher.open(owner, item["encrypted_content"]))
    except SealedSummaryError:
        raise ApiError(400, "The compaction item's 'encrypted_content' cannot be decrypted: it "
                       "was not produced by this gateway for this caller, or it was altered.",
                       param=param, code="invalid_encrypted_content") from None


def replay_compactions(cipher: CompactionCipher, owner: str,
                       history: Sequence[dict[str, Any]], new_items: Sequence[dict[str, Any]]
                       ) -> list[dict[str, Any]]:
    """`history + new_items` with every `compaction` item replaced by its summary message.

    A bad blob in the new input is a 400 naming `input[i].encrypted_content`; one in the stored
    history (sealed under a key since retired) names `previous_response_id`.
    """
    context: list[dict[str, Any]] = []
    for item in history:
        if item.get("type") == "compaction":
            context.append(_replay(cipher, owner, item, "previous_response_id"))
        else:
            context.append(item)
    for i, item in enumerate(new_items):
        if item.get("type") == "compaction":
            context.append(_replay(cipher, owner, item, f"input[{i}].encrypted_content"))
        else:
            context.append(item)
    return context
