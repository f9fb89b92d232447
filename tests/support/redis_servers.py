"""Helpers of the Redis store tests about memory: servers that evict, servers that are full, and the server's own
count of the commands it ran (``INFO commandstats``), which tells how often a store read the eviction policy."""

from __future__ import annotations

import pytest
import redis

from tests.support.redis_cluster import RedisServer

__all__ = ["OOM_MARKER", "config_reads", "fill_up", "nodes_of", "set_policy"]

OOM_MARKER = b"\x02\x00\xc8\x01"
"""What the middleware records when a response cannot be: a "not stored" marker, 4 bytes."""


def nodes_of(cluster_url: str) -> list[tuple[str, int]]:
    """The ``(host, port)`` of each node of a ``redis+cluster://`` URL."""
    addresses = cluster_url.removeprefix("redis+cluster://").partition("?")[0].split(",")
    return [(host, int(port)) for host, _, port in (address.partition(":") for address in addresses)]


def set_policy(client: redis.Redis, policy: str, maxmemory: str) -> None:
    """``CONFIG SET maxmemory-policy <policy> maxmemory <maxmemory>`` (e.g. ``"10mb"``, ``"0"``)."""
    client.config_set("maxmemory-policy", policy)
    client.config_set("maxmemory", maxmemory)


def config_reads(client: redis.Redis) -> int:
    """How many ``CONFIG GET`` the server has run since it started."""
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_config|get", {}).get("calls", 0))


def fill_up(server: RedisServer) -> None:
    """Make *server* full: about 4 MB of data, then ``maxmemory`` 1 MB below what it uses, under ``noeviction``.

    (Filling up to the limit is not enough: a refused write leaves the server just over it, and the query buffer
    Redis frees after the refusal can bring it under again, so that the next small write passes.)"""
    with server.client() as admin:
        set_policy(admin, "noeviction", "0")
        for index in range(40):
            admin.set(f"filler:{index}", b"x" * 100_000)
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory", str(used - 1_000_000))
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            admin.set("probe", "x")  # the server refuses writes now
