"""Open Responses ⇄ Chat Completions, pure: validation, translation, transcoder, resources, SSE.

Nothing here does I/O; everything is tested without sockets.
"""
