"""What ``idempo proxy`` accepts of a request, tried over raw sockets against the real command in front of real
upstream processes: odd request targets (none may reach any host but the upstream), dot segments, framing, stalled
and concurrent keyed uploads, the forwarding headers a client sends about itself, and the admin listener.

A second upstream, "forbidden", runs beside the real one on loopback and counts every request it gets: the targets
below name it in every way HTTP allows, and it must never hear from the proxy. Synchronisation is by what the other
processes did (a file, a metric), never by sleeps; no timing is asserted.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.proxy import (
    Proxy,
    RawResponse,
    Upstream,
    address,
    read_response,
    run_proxy,
    running_upstream,
    send_raw,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PROBLEM = "application/problem+json"
BODY_TIMEOUT = 2  # seconds: --body-timeout of the main proxy (a stalled upload is answered after it)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    with running_upstream(tmp_path_factory.mktemp("upstream")) as server:
        yield server


@pytest.fixture(scope="module")
def forbidden(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """Another service on the proxy's network, which no client may reach through the proxy."""
    with running_upstream(tmp_path_factory.mktemp("forbidden")) as server:
        yield server
        assert server.hits() == [], "a request reached a host the proxy does not forward to"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream, forbidden: Upstream) -> Iterator[Proxy]:
    """The upstream under a base path (/api), a key required under /payments/, and a short body timeout."""
    directory = tmp_path_factory.mktemp("proxy")
    args = ["--upstream", upstream.url + "/api", "--store", f"sqlite:///{directory / 'idempo.db'}"]
    args += ["--require-key-path", "/payments/", "--body-timeout", str(BODY_TIMEOUT)]
    with run_proxy(directory, args) as running:
        yield running


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Proxy]:
    """The upstream at its root, every option at its default."""
    directory = tmp_path_factory.mktemp("plain")
    with run_proxy(directory, ["--upstream", upstream.url, "--store", f"sqlite:///{directory / 'idempo.db'}"]) as p:
        yield p


def key() -> str:
    return str(uuid.uuid4())


def request(target: str, *, method: str = "GET", headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    """A request as bytes, with its target exactly as given."""
    lines = [f"{method} {target} HTTP/1.1", "Host: proxy.test"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body and not any(name.lower() in ("content-length", "transfer-encoding") for name in headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def assert_refused(response: RawResponse, status: int, slug: str) -> None:
    assert response.status == status, response
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"].endswith(slug)
    assert response.closed  # the proxy closes the connection: a body it did not read may follow


# -- request targets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target", "status"),
    [
        ("GET", "@127.0.0.1:{forbidden}/op/x", 400),  # the upstream's host would have become userinfo
        ("POST", "@127.0.0.1:{forbidden}/op/x", 400),
        ("GET", "http://127.0.0.1:{forbidden}/op/x", 400),  # absolute-form
        ("POST", "http://127.0.0.1:{forbidden}/op/x", 400),
        ("OPTIONS", "http://127.0.0.1:{forbidden}/op/x", 400),
        ("GET", "*", 400),  # asterisk-form is for OPTIONS only
        ("POST", "*", 400),
        ("CONNECT", "127.0.0.1:{forbidden}", 400),  # authority-form: this is not a forward proxy
        ("GET", "x/op/y", 400),
        ("GET", "/op/x#fragment", 400),
        ("GET", "/a/%2F../op/x", 400),  # a dot segment behind an encoded slash
        ("GET", "/%2e%2e/op/x", 400),
    ],
)
def test_a_target_that_is_not_a_path_is_400_and_reaches_no_host(
    proxy: Proxy, upstream: Upstream, forbidden: Upstream, method: str, target: str, status: int
) -> None:
    before = upstream.hits()
    target = target.format(forbidden=forbidden.port)
    headers = {"Idempotency-Key": key()} if method == "POST" else {}
    response = send_raw(proxy.url, request(target, method=method, headers=headers, body=b"x" * 3), closing=True)
    assert_refused(response, status, "invalid-target")
    assert upstream.hits() == before
    assert forbidden.hits() == []


def test_an_empty_target_is_refused_by_the_server(proxy: Proxy, upstream: Upstream) -> None:
    before = upstream.hits()
    response = send_raw(proxy.url, b"GET  HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
    assert response.status == 400  # uvicorn's own answer: the app never sees it
    assert upstream.hits() == before


def test_options_asterisk_is_answered_by_the_proxy(proxy: Proxy, upstream: Upstream, forbidden: Upstream) -> None:
    before = upstream.hits()
    response = send_raw(proxy.url, request("*", method="OPTIONS"))
    assert response.status == 200
    assert response.headers["content-length"] == "0"
    assert response.body == b""
    assert upstream.hits() == before
    assert forbidden.hits() == []


def test_a_path_that_looks_like_an_authority_is_a_path_of_the_upstream(
    proxy: Proxy, upstream: Upstream, forbidden: Upstream
) -> None:
    target = f"//127.0.0.1:{forbidden.port}/op/x"
    response = send_raw(proxy.url, request(target + "?q=1"))
    assert response.status == 404  # the upstream's answer, for its path /api//127.0.0.1:PORT/op/x
    assert upstream.hits()[-1] == f"GET /api{target}?q=1"
    assert forbidden.hits() == []


@pytest.mark.parametrize(
    "target",
    [
        "/./payments/x",  # would have been checked as not under /payments/, and forwarded as /api/payments/x
        "/other/../payments/x",
        "/payments/./x",
        "/../x",  # would have escaped the upstream's base path /api
        "/%2e%2e/x",
        "/%2E/payments/x",
        "/a/..;/payments/x",  # '..;' is '..' to some servers (Tomcat)
        "/a\\..\\payments/x",  # and '\\' is '/' to others
        "/a%5c..%5cpayments/x",
        "/a%2f..%2fpayments/x",
    ],
)
def test_a_path_with_dot_segments_is_400_and_not_forwarded(proxy: Proxy, upstream: Upstream, target: str) -> None:
    before = upstream.hits()
    response = send_raw(proxy.url, request(target, method="POST", body=b"{}"), closing=True)  # no key
    assert_refused(response, 400, "invalid-target")
    assert "dot segments" in response.json()["detail"]
    assert upstream.hits() == before


def test_paths_checked_are_the_paths_forwarded(proxy: Proxy, upstream: Upstream) -> None:
    # Without dot segments, the require-key check sees the path the upstream gets (under its base path).
    assert_refused_missing = send_raw(proxy.url, request("/payments/x", method="POST", body=b"{}"))
    assert assert_refused_missing.status == 400
    assert assert_refused_missing.json()["type"].endswith("missing-key")
    # An encoded slash is data: checked as a '/', forwarded as sent.
    encoded = send_raw(proxy.url, request("/payments%2Fx", method="POST", body=b"{}"))
    assert encoded.status == 400
    assert encoded.json()["type"].endswith("missing-key")
    # Dots that are not whole segments are ordinary names.
    for target in ("/.well-known/x", "/a..b/c.d", "/a/...", "/a/%2e%2e%2e"):
        response = send_raw(proxy.url, request(target))
        assert response.status == 404  # the upstream's
        assert upstream.hits()[-1] == f"GET /api{target}?"


# -- framing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "unkeyed"])
def test_content_length_with_transfer_encoding_is_400_and_the_connection_closes(
    proxy: Proxy, upstream: Upstream, keyed: bool
) -> None:
    before = upstream.hits()
    headers = {"Content-Length": "5", "Transfer-Encoding": "chunked"}
    if keyed:
        headers["Idempotency-Key"] = key()
    smuggled = b"0\r\n\r\nGET /op/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    response = send_raw(proxy.url, request("/op/x", method="POST", headers=headers, body=smuggled), closing=True)
    assert_refused(response, 400, "invalid-framing")
    assert upstream.hits() == before


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "unkeyed"])
def test_a_chunked_body_is_forwarded_whole_with_its_own_length(plain: Proxy, keyed: bool) -> None:
    headers = {"Transfer-Encoding": "chunked", "Idempotency-Key": key()} if keyed else {"Transfer-Encoding": "chunked"}
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    response = send_raw(plain.url, request("/echo", method="POST", headers=headers, body=body))
    assert response.status == 200
    seen = response.json()
    assert seen["length"] == 11
    names = [name for name, _ in seen["headers"]]
    assert "transfer-encoding" not in names or "content-length" not in names  # never both
    if "content-length" in names:
        assert ["content-length", "11"] in seen["headers"]


# -- keyed bodies: a deadline, and a budget of memory ------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_stalled_keyed_upload_is_408_after_the_body_timeout(proxy: Proxy, upstream: Upstream, framing: str) -> None:
    before = upstream.hits()
    if framing == "chunked":
        head = request("/op/stalled", method="POST", headers={"Idempotency-Key": key(), "Transfer-Encoding": "chunked"})
        part = b"a\r\n0123456789\r\n"
    else:
        head = request("/op/stalled", method="POST", headers={"Idempotency-Key": key(), "Content-Length": "1000"})
        part = b"0123456789"
    with socket.create_connection(address(proxy.url), timeout=BODY_TIMEOUT + 30) as sock:
        sock.sendall(head + part)  # and nothing more: the rest never comes
        response = read_response(sock, closing=True)
    assert_refused(response, 408, "body-timeout")
    assert upstream.hits() == before


def poll_until(probe: Callable[[], bool], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # another process's state: nothing to wait on but a poll


def _gauge(url: str) -> float:
    for line in httpx.get(url + "/_idempo/metrics").text.splitlines():
        if line.startswith("idempo_proxy_buffered_bytes "):
            return float(line.split()[1])
    raise AssertionError("no idempo_proxy_buffered_bytes in the metrics")


def test_keyed_bodies_in_memory_are_bounded_and_the_one_over_is_503(tmp_path: Path, upstream: Upstream) -> None:
    args = ["--upstream", upstream.url, "--store", f"sqlite:///{tmp_path / 'idempo.db'}", "--retry-after", "3"]
    args += ["--max-request-bytes", "40KiB", "--max-buffered-bytes", "64KiB", "--body-timeout", "60"]
    size = 40 * 1024
    name = uuid.uuid4().hex[:10]
    first_key = key()
    with run_proxy(tmp_path, args) as bounded, socket.create_connection(address(bounded.url), timeout=30) as first:
        # One upload declares 40 KiB and sends half of it: the proxy holds its 40 KiB.
        headers = {"Idempotency-Key": first_key, "Content-Length": str(size)}
        first.sendall(request(f"/op/{name}", method="POST", headers=headers) + b"a" * (size // 2))
        poll_until(lambda: _gauge(bounded.url) >= size, "the proxy to hold the first body")
        # A second, declared: over the budget at once. A third, chunked: over it once its chunks come.
        second = send_raw(bounded.url, request(f"/op/{name}-2", method="POST", headers={"Idempotency-Key": key()},
                                               body=b"b" * size), closing=True)  # fmt: skip
        assert_refused(second, 503, "proxy-busy")
        assert second.headers["retry-after"] == "3"
        chunk = b"c" * (size // 2)
        chunked = b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2 + b"0\r\n\r\n"
        third_headers = {"Idempotency-Key": key(), "Transfer-Encoding": "chunked"}
        third = send_raw(
            bounded.url, request(f"/op/{name}-3", method="POST", headers=third_headers, body=chunked), closing=True
        )
        assert_refused(third, 503, "proxy-busy")
        # The first one completes, is forwarded, and gives its bytes back.
        first.sendall(b"a" * (size // 2))
        done = read_response(first)
        assert done.status == 201
        assert _gauge(bounded.url) == 0
        again = send_raw(bounded.url, request(f"/op/{name}-2", method="POST", headers={"Idempotency-Key": key()},
                                              body=b"b" * size))  # fmt: skip
        assert again.status == 201
    assert upstream.count(name) == 1
    assert upstream.count(f"{name}-2") == 1
    assert upstream.count(f"{name}-3") == 0


# -- forwarding headers and the admin listener --------------------------------------------------------------------


def test_forwarding_headers_a_client_sends_about_itself_are_dropped(plain: Proxy) -> None:
    claims = {
        "Forwarded": "for=10.0.0.1;proto=https;host=admin.internal",
        "X-Real-IP": "10.0.0.1",
        "X-Forwarded-For": "10.0.0.1",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "admin.internal",
        "X-Forwarded-Port": "443",
        "X-Forwarded-Prefix": "/admin",
        "X-Original-URL": "/admin/delete",
        "True-Client-IP": "10.0.0.1",
    }
    response = send_raw(plain.url, request("/echo", headers=claims))
    seen = {name: value for name, value in response.json()["headers"]}
    for claim in claims:
        assert seen.get(claim.lower()) != claims[claim], claim
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "proxy.test"
    assert not {"forwarded", "x-real-ip", "x-forwarded-port", "x-forwarded-prefix", "x-original-url"} & set(seen)


def test_with_an_admin_listener_the_own_endpoints_are_served_there_only(tmp_path: Path, upstream: Upstream) -> None:
    args = ["--upstream", upstream.url, "--store", f"sqlite:///{tmp_path / 'idempo.db'}"]
    args += ["--admin-listen", "127.0.0.1:0"]
    with run_proxy(tmp_path, args) as split:
        assert split.admin_url is not None
        assert split.admin_url != split.url
        with httpx.Client(timeout=30) as http:
            health = http.get(split.admin_url + "/_idempo/healthz")
            metrics = http.get(split.admin_url + "/_idempo/metrics")
            elsewhere = http.post(split.admin_url + "/op/admin-door", headers={"Idempotency-Key": key()})
            before = len(upstream.hits())
            public_health = http.get(split.url + "/_idempo/healthz")
            public_metrics = http.get(split.url + "/_idempo/metrics")
            forwarded = upstream.hits()[before:]
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert metrics.status_code == 200
    assert "idempo_proxy_buffered_bytes" in metrics.text
    assert elsewhere.status_code == 404  # the admin listener forwards nothing
    assert upstream.count("admin-door") == 0
    # On the public listener the prefix is the upstream's, like any path.
    assert public_health.status_code == public_metrics.status_code == 404
    assert forwarded == ["GET /_idempo/healthz?", "GET /_idempo/metrics?"]
