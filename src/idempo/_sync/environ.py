"""What the blocking faces read from a WSGI environ: the path, the ``Authorization`` header, the body (bounded)
and how the app gets it back. Strictly private (``idempo.wsgi`` re-exports :func:`request_path`)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, Final

from .guard import Answer, Guard

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIEnvironment
else:  # the names exist only for type checkers
    WSGIEnvironment = Any

__all__ = ["authorization", "give_body", "read_body", "request_path"]

_READ_CHUNK: Final = 64 * 1024


def request_path(environ: WSGIEnvironment) -> str:
    """The request's path (``SCRIPT_NAME`` + ``PATH_INFO``), decoded from the latin-1 of PEP 3333 as UTF-8, as the
    ASGI ``path`` is (bytes that are not UTF-8 kept as surrogates)."""
    raw: str = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    return raw.encode("latin-1").decode("utf-8", "surrogateescape")


def authorization(environ: WSGIEnvironment) -> tuple[bytes, ...]:
    """The values of the request's ``Authorization`` header (one at most: a server joins repeated ones)."""
    value = environ.get("HTTP_AUTHORIZATION")
    return () if value is None else (value.encode("latin-1"),)


def read_body(guard: Guard, environ: WSGIEnvironment) -> bytes | Answer:
    """The whole body, bounded by ``max_request_bytes``; a chunked body (``wsgi.input_terminated``, as gunicorn and
    uWSGI set) is read to its end. Without either a ``Content-Length`` or that flag, the body is empty (PEP 3333: the
    app must not read beyond ``Content-Length``), as werkzeug and Django read it."""
    stream = environ.get("wsgi.input")
    declared = environ.get("CONTENT_LENGTH", "")
    if stream is None:
        return b""
    if declared and declared.strip().isdigit():
        length = int(declared)
        too_large = guard.too_large(length, declared=True)
        if too_large is not None:
            return too_large
        return bytes(stream.read(length)) if length else b""
    if not environ.get("wsgi.input_terminated"):
        return b""
    limit = guard.policy.max_request_bytes
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = stream.read(min(_READ_CHUNK, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        chunks.append(chunk)
        too_large = guard.too_large(size, declared=False)
        if too_large is not None:
            return too_large


def give_body(environ: WSGIEnvironment, body: bytes) -> None:
    """Hand the buffered body to the app, as a stream of its declared length."""
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    environ.pop("HTTP_TRANSFER_ENCODING", None)
    environ["wsgi.input_terminated"] = True
