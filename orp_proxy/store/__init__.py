"""Where finished responses are kept: one interface (`base`), SQLite (`sqlite`, the default)
or PostgreSQL (`postgres`, shared by several hosts) behind it, chosen by URL (`factory`)."""

from orp_proxy.store.base import InputItemsPage, ResponseStore, StoredResponse, StoreUnavailable

__all__ = ["InputItemsPage", "ResponseStore", "StoreUnavailable", "StoredResponse"]
