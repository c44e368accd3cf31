"""Where finished responses are kept: one interface (`base`), SQLite behind it (`sqlite`)."""

from orp_proxy.store.base import InputItemsPage, ResponseStore, StoredResponse

__all__ = ["InputItemsPage", "ResponseStore", "StoredResponse"]
