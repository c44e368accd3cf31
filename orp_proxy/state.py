"""What every handler of one worker shares, stored on the application under one `AppKey`."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from orp_proxy.config import Settings
from orp_proxy.protocol.summaries import CompactionCipher
from orp_proxy.protocol.validation import DEFAULT_LIMITS, RequestLimits
from orp_proxy.routing import Routes
from orp_proxy.store import ResponseStore
from orp_proxy.upstream.client import UpstreamClient


@dataclass
class Gateway:
    """The per-worker resources: settings, the upstream client(s) and the response store.

    `router` opens every upstream request; `upstream` is the single upstream's client (with a
    configuration file of models: the first upstream's, for code that needs a session)."""

    settings: Settings
    upstream: UpstreamClient
    store: ResponseStore
    router: Routes
    limits: RequestLimits = field(default=DEFAULT_LIMITS)
    # Built from the settings and the store, so a bad ORP_COMPACTION_KEY stops start-up.
    compaction: CompactionCipher = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.compaction = CompactionCipher.create(self.settings.resolved_compaction_key(),
                                                  self.store.owner_id)


GATEWAY = web.AppKey("gateway", Gateway)
