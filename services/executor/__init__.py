"""The executor service: runs one attempt of one step at a time, exactly once per attempt.

Layout: ``domain/`` (pure: attempt fencing, result classification, claim
checks), ``adapters/`` (Redis, HTTP, gRPC, Kafka wire), ``handlers.py`` (load ->
decide -> commit), ``main.py`` (the composition root), ``tools.py`` (the
plug-in API: ``from services.executor.tools import tool``)."""
