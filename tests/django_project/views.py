"""The test project's views. Each keyed view writes one :class:`~tests.django_project.models.Order` to the ledger
database (``settings.LEDGER_DATABASE``), then answers; the order's ``sku`` comes from the JSON body, so that a test
counts its own rows.

The fault hook of the crash tests: a request with ``X-Fault: before-commit`` SIGKILLs its worker right after the
view's insert (inside the transaction, under the middleware's ``"ATOMIC"``); with ``X-Fault: after-commit``, right
after the transaction that holds the insert commits (a ``transaction.on_commit`` callback the view registers before
idempo's; without a transaction, at once after the insert, which committed on its own).
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from idempo import OutcomeUnknownError, SyncStore, mark_outcome_unknown
from idempo._core.bound import current

from .models import Order


class Gate:
    """Holds a request inside its view until the test opens it: ``started`` is set once the view has written its
    order, and the view then waits (a minute at most) for ``opened``."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.opened = threading.Event()


GATES: dict[str, Gate] = {}
"""The gates of the running test, by the name a request's body gives in ``"gate"``."""


def _data(request: HttpRequest) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(request.body or b"{}")
    return data


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _write(request: HttpRequest) -> Order:
    user = request.user.get_username() if request.user.is_authenticated else ""
    ledger = settings.LEDGER_DATABASE
    order: Order = Order.objects.using(ledger).create(
        sku=_data(request).get("sku", ""), key=request.idempotency_key, user=user, pid=os.getpid()
    )
    fault = request.headers.get("X-Fault")
    if fault == "before-commit":
        _kill()
    elif fault == "after-commit":  # registered before idempo's own on_commit callback: it runs first
        transaction.on_commit(_kill, using=ledger)
    return order


def _hold(hold: str) -> None:
    """The gate of a server in another process: touch ``<hold>.started``, then wait (a minute at most) while the
    file *hold* exists; the test deletes it to let the view go on."""
    Path(f"{hold}.started").touch()
    deadline = time.monotonic() + 60
    while Path(hold).exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def orders(request: HttpRequest) -> HttpResponse:
    """``POST /orders``: write the order, then wait at the body's ``"gate"`` (in the test's process) or while the
    file the body's ``"hold"`` names exists (:func:`_hold`; ``"hold_before"``: the same, before the order is
    written), if any; answer 201, with a cookie."""
    data = _data(request)
    if data.get("hold_before"):
        _hold(data["hold_before"])
    order = _write(request)
    gate = GATES.get(data.get("gate", ""))
    if gate is not None:
        gate.started.set()
        gate.opened.wait(60)
    if data.get("hold"):
        _hold(data["hold"])
    response = JsonResponse(
        {"id": order.pk, "sku": order.sku, "key": order.key, "user": order.user, "pid": order.pid}, status=201
    )
    response.set_cookie("session_hint", "1")
    return response


def atomic_orders(request: HttpRequest) -> HttpResponse:
    """``POST /atomic-orders``: write the order in an atomic block of the view's own, then answer 201."""
    with transaction.atomic(using=settings.LEDGER_DATABASE):
        order = _write(request)
    return JsonResponse({"id": order.pk, "sku": order.sku}, status=201)


def takeover(request: HttpRequest) -> HttpResponse:
    """``POST /takeover``: the request's key taken over on the store's own connections, as a retry does once the
    request's lease ran out (its record deleted, then claimed under the token ``"intruder"``), before the view
    writes its order and answers 201."""
    bound = current()
    assert bound is not None, "a keyed request"
    store: SyncStore = bound.store  # type: ignore[assignment]  # a Bound keeps the face's SyncStore
    store.delete(bound.store_key)
    store.claim(bound.store_key, "intruder", lease=60, ttl=60, token="intruder")
    order = _write(request)
    return JsonResponse({"id": order.pk}, status=201)


def unknown(request: HttpRequest) -> HttpResponse:
    """``POST /unknown``: write the order, then raise ``OutcomeUnknownError`` (a provider that timed out)."""
    _write(request)
    msg = "the payment provider timed out"
    raise OutcomeUnknownError(msg)


def mark_unknown(request: HttpRequest) -> HttpResponse:
    """``POST /mark-unknown``: write the order, say its outcome is unknown, and answer 202 all the same."""
    _write(request)
    mark_outcome_unknown()
    return JsonResponse({"status": "pending"}, status=202)


def fail(request: HttpRequest) -> HttpResponse:
    """``POST /fail``: write the order and answer 502."""
    _write(request)
    return HttpResponse(b"upstream down", status=502)


def boom(request: HttpRequest) -> HttpResponse:
    """``POST /boom``: write the order and raise (Django answers 500)."""
    _write(request)
    msg = "the view failed"
    raise RuntimeError(msg)


def missing(request: HttpRequest) -> HttpResponse:
    """``POST /missing``: write the order and raise ``Http404`` (Django answers 404: the app's answer, kept)."""
    _write(request)
    msg = "no such thing"
    raise Http404(msg)


def stream(request: HttpRequest) -> StreamingHttpResponse:
    """``POST /stream``: write the order and stream ten numbered chunks."""
    order = _write(request)

    def chunks() -> Iterator[bytes]:
        for number in range(10):
            yield b"chunk %d of order %d\n" % (number, order.pk)

    return StreamingHttpResponse(chunks(), status=201, content_type="text/plain")


def astream(request: HttpRequest) -> StreamingHttpResponse:
    """``POST /astream``: write the order and stream five chunks from an async iterator."""
    order = _write(request)

    async def chunks() -> AsyncIterator[bytes]:
        for number in range(5):
            yield b"async chunk %d of order %d\n" % (number, order.pk)

    return StreamingHttpResponse(chunks(), status=201, content_type="text/plain")


def download(request: HttpRequest) -> FileResponse:
    """``POST /file``: write the order and answer a file (Django's ``FileResponse``)."""
    order = _write(request)
    return FileResponse(io.BytesIO(b"receipt %d\n" % order.pk * 5000), filename="receipt.txt")


def key(request: HttpRequest) -> JsonResponse:
    """``/key`` (any method): the request's ``idempotency_key``."""
    return JsonResponse({"key": request.idempotency_key})


def health(request: HttpRequest) -> HttpResponse:
    """``GET /health``."""
    return HttpResponse(b"ok")
