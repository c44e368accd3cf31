"""The HTTP edge: routes, middleware, request helpers, one module per endpoint family, WebSocket."""
