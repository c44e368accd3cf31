"""Running it in production: auth, access log, metrics, health, keep-alive, gunicorn config."""
