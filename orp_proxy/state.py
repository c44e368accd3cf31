"""What every handler of one worker shares, stored on the application under one `AppKey`."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from .config import Settings
from .store import ResponseStore
from .summaries import CompactionCipher
from .upstream import UpstreamClient
from .validation import DEFAULT_LIMITS, RequestLimits


@dataclass
class Gateway:
    """The per-worker resources: settings, the upstream client and the response store."""

    settings: Settings
    upstream: UpstreamClient
    store: ResponseStore
    limits: RequestLimits = field(default=DEFAULT_LIMITS)
    # Built from the settings and the store, so a bad ORP_COMPACTION_KEY stops start-up.
    compaction: CompactionCipher = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.compaction = CompactionCipher.create(self.settings.resolved_compaction_key(),
                                                  self.store)


GATEWAY = web.AppKey("gateway", Gateway)
