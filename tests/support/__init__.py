"""Helpers the test modules share: no tests here. ``environment`` (servers and the one rule for a missing one: skip
locally, fail under ``CI=true``), ``middleware`` (a counting app, store spies, a raw ASGI driver), ``stores``,
``redis_cluster`` and ``redis_servers`` (private redis-servers and a real cluster), ``processes`` (uvicorn workers
for the end-to-end tests), ``proxy`` and ``proxy_upstream`` (``idempo proxy`` and its counting upstream),
``in_process`` (what ``pytest --in-process``, ``make check``, leaves out)."""
