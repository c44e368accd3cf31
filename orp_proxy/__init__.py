"""ORP: an Open Responses gateway in front of Chat Completions backends."""

__version__ = "0.1.0"
