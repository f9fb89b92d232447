"""Prometheus metrics for :class:`~idempo.IdempotencyMiddleware`: an :class:`~idempo.observe.Observer` that counts
requests by outcome and times store calls, on prometheus_client (``pip install 'idempo[metrics]'``)::

    from idempo.metrics import PrometheusObserver

    observer = PrometheusObserver()
    app.add_middleware(IdempotencyMiddleware, store="sqlite:///idempo.db", observer=observer)
    # and serve observer.exposition() at /metrics, or pass registry=prometheus_client.REGISTRY

Metrics (with the default ``namespace="idempo"``):

- ``idempo_requests_total{outcome}``: HTTP requests the middleware saw, by :data:`~idempo.observe.Outcome`
  (``passthrough``, ``executed``, ``replayed``, ``conflict``, ``mismatch``, ``bad_key``, ``too_large``,
  ``store_error``). Every outcome is exported from the start, at 0.
- ``idempo_store_call_seconds{operation}``: a histogram of the duration of store calls (``claim``, ``renew``,
  ``complete``, ``release``), failed ones included.
- ``idempo_store_call_errors_total{operation}``: store calls that failed.

Several processes (``uvicorn --workers N``, gunicorn): use prometheus_client's multiprocess mode. Set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the workers start; each process then writes its values
there, and :meth:`PrometheusObserver.exposition` sums every process's, whichever worker answers the scrape. (That is
what ``idempo proxy --workers N`` does.)

Importing this module without prometheus_client raises :class:`~idempo.MissingDependency`.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any, Final

from ._core.errors import MissingDependency
from .observe import OUTCOMES, Outcome, StoreOperation

try:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client import multiprocess as _multiprocess
except ModuleNotFoundError as exc:  # pragma: no cover - exercised by a test that hides the module
    if exc.name != "prometheus_client":
        raise
    _msg = "idempo.metrics needs prometheus_client; run: pip install 'idempo[metrics]'"
    raise MissingDependency(_msg) from exc

__all__ = ["CONTENT_TYPE", "STORE_BUCKETS", "PrometheusObserver", "exposition", "multiprocess_mode"]

CONTENT_TYPE: Final[str] = "text/plain; version=0.0.4; charset=utf-8"
"""The ``Content-Type`` of :meth:`PrometheusObserver.exposition`: the classic Prometheus text format, which every
Prometheus version (and every scraper that speaks it) reads; the metric names are all legacy-valid, so the text is
the same in the newer 1.0.0 format."""

STORE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Histogram buckets of store calls, in seconds: a local store answers in well under a millisecond, a remote one in
a few, a failing one in its timeout."""

_STORE_OPERATIONS: Final[tuple[StoreOperation, ...]] = ("claim", "renew", "complete", "release")


def multiprocess_mode() -> bool:
    """Whether prometheus_client writes values for several processes (``PROMETHEUS_MULTIPROC_DIR`` is set)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class PrometheusObserver:
    """Count the middleware's requests by outcome and time its store calls, as Prometheus metrics.

    Args:
        registry: where the metrics are registered. By default a registry of their own (so that several observers,
            e.g. in tests, never clash); pass ``prometheus_client.REGISTRY`` to serve them with your other metrics.
        namespace: the prefix of every metric name.
        buckets: the histogram buckets of store call durations, in seconds.

    The observer is cheap (a counter increment per request, a histogram observation per store call) and never
    raises from its hooks. In multiprocess mode (:func:`multiprocess_mode`), values go to files shared by the
    processes, and :meth:`exposition` reads them all.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str = "idempo",
        buckets: tuple[float, ...] = STORE_BUCKETS,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "requests",
            "HTTP requests seen by the idempotency middleware, by outcome",
            ["outcome"],
            namespace=namespace,
            registry=self.registry,
        )
        self.store_seconds = Histogram(
            "store_call_seconds",
            "Duration of the idempotency store's calls, by operation",
            ["operation"],
            namespace=namespace,
            registry=self.registry,
            buckets=buckets,
        )
        self.store_errors = Counter(
            "store_call_errors",
            "Idempotency store calls that failed, by operation",
            ["operation"],
            namespace=namespace,
            registry=self.registry,
        )
        # Children made once: a labelled lookup per request would cost a lock and a dict lookup more.
        self._outcomes = {outcome: self.requests.labels(outcome) for outcome in OUTCOMES}
        self._seconds = {op: self.store_seconds.labels(op) for op in _STORE_OPERATIONS}
        self._errors = {op: self.store_errors.labels(op) for op in _STORE_OPERATIONS}

    def on_request(self, outcome: Outcome, scope: MutableMapping[str, Any]) -> None:
        """Count one request under its outcome."""
        child = self._outcomes.get(outcome)
        if child is None:  # an outcome added after this module was written
            child = self._outcomes[outcome] = self.requests.labels(outcome)
        child.inc()

    def on_store_call(self, operation: StoreOperation, seconds: float, error: BaseException | None) -> None:
        """Observe one store call's duration, and count it if it failed."""
        histogram = self._seconds.get(operation)
        if histogram is None:
            histogram = self._seconds[operation] = self.store_seconds.labels(operation)
        histogram.observe(seconds)
        if error is not None:
            self.store_errors.labels(operation).inc()

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format (serve it with :data:`CONTENT_TYPE`).

        In multiprocess mode, the sum of every process's values (read from ``PROMETHEUS_MULTIPROC_DIR``); otherwise
        this observer's registry (and whatever else is registered in it).
        """
        return exposition(self.registry)


def exposition(registry: CollectorRegistry) -> bytes:
    """*registry* in the Prometheus text format; in multiprocess mode, every process's values instead."""
    if multiprocess_mode():
        collected = CollectorRegistry()
        _multiprocess.MultiProcessCollector(collected)  # type: ignore[no-untyped-call]
        return bytes(generate_latest(collected))
    return bytes(generate_latest(registry))
