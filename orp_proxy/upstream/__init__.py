"""The Chat Completions side: the streaming client, error scrubbing, and the scripted mock."""
