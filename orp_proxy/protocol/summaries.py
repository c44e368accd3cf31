"""Sealed `encrypted_content` blobs (compaction summaries and reasoning), replayed from them.

`POST /v1/responses/compact` hands the client its summary inside a `compaction` item, and a
response asked for `include: ["reasoning.encrypted_content"]` gives each `reasoning` item its
text sealed the same way: Fernet (AES-128-CBC + HMAC-SHA256, from the `cryptography` package)
under a key derived with HKDF-SHA256 from `ORP_COMPACTION_KEY`, or, when that is unset, from the
store's owner-hash key (so every worker of one deployment agrees without configuration). The
sealed payload names the owner it was made for and its purpose (`compaction` or `reasoning`);
another owner's request cannot open it, so a leaked blob cannot be turned back into text through
someone else's credential, and a blob of one purpose is refused in the place of the other.

`replay_sealed` prepares a request's context for translation: a `compaction` item becomes a user
message carrying the summary (a user message, not a system one: the summary is model-written text
derived from user-supplied content, and must not gain the authority of instructions), and a
`reasoning` item with `encrypted_content` gets its unsealed text as `content`.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
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
COMPACTION = "compaction"
REASONING = "reasoning"
_HKDF_INFO = b"orp compaction summary v1"
# A label no HTTP client can present as its bearer token (header values cannot contain NUL), so
# the store's keyed hash of it is a key no owner id can ever equal.
_DERIVATION_LABEL = "\x00orp:compaction-key:v1"


class SealedSummaryError(ValueError):
    """A blob that does not open: tampered, truncated, another deployment's, another owner's, or
    sealed for another purpose."""


def _fernet(secret: bytes) -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(secret)
    return Fernet(base64.urlsafe_b64encode(key))


class CompactionCipher:
    """Seals and opens summaries and reasoning; the first key seals, every key opens (rotation).

    `purpose` binds a blob to what it was made for: compaction blobs (whose payload predates the
    label and so has none) and reasoning blobs cannot stand in for each other."""

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

    def seal(self, owner: str, summary: str, *, purpose: str = COMPACTION) -> str:
        fields: dict[str, Any] = {"v": _FORMAT, "owner": owner, "summary": summary}
        if purpose != COMPACTION:
            fields["purpose"] = purpose
        payload = ujson.dumps(fields, ensure_ascii=True, escape_forward_slashes=False)
        return self._box.encrypt(payload.encode()).decode("ascii")

    def open(self, owner: str, blob: str, *, purpose: str = COMPACTION) -> str:
        """The text sealed in `blob` for `owner` and `purpose`; `SealedSummaryError` otherwise."""
        try:
            payload = ujson.loads(self._box.decrypt(blob.encode("utf-8", "surrogatepass")))
        except (InvalidToken, ValueError, TypeError):
            raise SealedSummaryError("the blob does not open with this deployment's keys"
                                     ) from None
        if (not isinstance(payload, dict) or payload.get("v") != _FORMAT
                or payload.get("owner") != owner or not isinstance(payload.get("summary"), str)
                or payload.get("purpose", COMPACTION) != purpose):
            raise SealedSummaryError("the blob was not made for this caller")
        summary: str = payload["summary"]
        return summary


def summary_message(summary: str) -> dict[str, Any]:
    """The input item that stands in for a compaction item when the context goes upstream."""
    return {"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": SUMMARY_PREFIX + summary}]}


def _unseal(cipher: CompactionCipher, owner: str, blob: str, purpose: str, param: str) -> str:
    try:
        return cipher.open(owner, blob, purpose=purpose)
    except SealedSummaryError:
        raise ApiError(400, f"The {purpose} item's 'encrypted_content' cannot be decrypted: it "
                       "was not produced by this gateway for this caller, or it was altered.",
                       param=param, code="invalid_encrypted_content") from None


def _replayed(cipher: CompactionCipher, owner: str, item: dict[str, Any], param: str,
              *, trusted: bool) -> dict[str, Any]:
    kind = item.get("type")
    if kind == COMPACTION:
        return summary_message(_unseal(cipher, owner, item["encrypted_content"], COMPACTION,
                                       param))
    if kind == REASONING and item.get("encrypted_content"):
        if trusted and item.get("content"):
            # Our own stored output keeps the text beside the blob: no need to open it (and a
            # key retired since then does not strand the conversation).
            return item
        text = _unseal(cipher, owner, item["encrypted_content"], REASONING, param)
        return {**item, "content": [{"type": "reasoning_text", "text": text}]}
    return item


def replay_sealed(cipher: CompactionCipher, owner: str,
                  history: Sequence[dict[str, Any]], new_items: Sequence[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    """`history + new_items` with sealed items opened for translation.

    Every `compaction` item becomes its summary message; every `reasoning` item carrying
    `encrypted_content` gets the unsealed text as its `content` (a client-sent blob is always
    checked, even when the item also carries text). A bad blob in the new input is a 400 naming
    `input[i].encrypted_content`; one in the stored history (sealed under a key since retired)
    names `previous_response_id`.
    """
    context = [_replayed(cipher, owner, item, "previous_response_id", trusted=True)
               for item in history]
    context.extend(_replayed(cipher, owner, item, f"input[{i}].encrypted_content", trusted=False)
                   for i, item in enumerate(new_items))
    return context

