"""Watching a worker: the event bus and its subscribers (log, metrics, progress, webhooks),
and the rates the views show."""
