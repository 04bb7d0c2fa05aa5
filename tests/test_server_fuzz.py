"""Property-based HTTP fuzz of the reference server (hypothesis): methods, paths, query strings,
headers, content types and bodies (random bytes, mutated JPEG/PNG, hand-built multipart). Whatever
arrives, the answer is never a 500, every error has the one JSON schema, and the server stays up.
"""

from __future__ import annotations

import socket

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_server import KNOWN_CODES, make_jpeg, make_pipeline, make_png  # noqa: E402

from aurora_core.batching import BatchingConfig  # noqa: E402
from aurora_core.server import Server  # noqa: E402
from aurora_core.server_app import ServerConfig  # noqa: E402

LIMIT = 32 << 10
JPEG = make_jpeg(1, w=40, h=30)
PNG = make_png(2)


@pytest.fixture(scope="module")
def server():
    batching = BatchingConfig(max_batch_size=4, max_queue_delay_us=500, max_queue_size=64)
    with make_pipeline(batching=batching) as pipe, \
            Server(pipe, ServerConfig(max_body_bytes=LIMIT, body_timeout_s=0.5), keepalive_s=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@st.composite
def mutated(draw, base: bytes):
    """A valid image with a few bytes flipped, cut, or spliced in: the decoder's hard cases."""
    data = bytearray(base)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos: pos + draw(st.integers(1, 64))]
        else:
            data[pos:pos] = draw(st.binary(max_size=32))
    return bytes(data)


TOKEN = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters='"\\;,'), min_size=1,
                max_size=20)


@st.composite
def multipart(draw):
    boundary = draw(st.text(st.characters(min_codepoint=48, max_codepoint=122, categories=["L", "N"]),
                            min_size=1, max_size=30))
    body = b""
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["image", "file", "other", ""]))
        filename = draw(st.sampled_from(['; filename="a.jpg"', ""]))
        payload = draw(st.one_of(st.just(JPEG), mutated(JPEG), st.binary(max_size=200)))
        extra = draw(st.sampled_from([b"", b"Content-Type: image/jpeg\r\n", b"X-Junk\r\n", b"A: " + b"b" * 5000 + b"\r\n"]))
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"{filename}\r\n".encode()
                 + extra + b"\r\n" + payload + b"\r\n")
    if draw(st.booleans()):
        body += f"--{boundary}--\r\n".encode()
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    if draw(st.integers(0, 4)) == 0:
        body = draw(st.binary(max_size=16)) + body
    ctype = draw(st.sampled_from([f"multipart/form-data; boundary={boundary}", "multipart/form-data",
                                  f'multipart/form-data; boundary="{boundary}"']))
    return ctype, body


CONTENT_TYPES = st.one_of(
    st.sampled_from(["image/jpeg", "image/png", "application/octet-stream", "image/gif", "text/plain",
                     "application/json", "image/jpeg; charset=utf-8", "", "multipart/form-data; boundary=abc",
                     "multipart/form-data", "multipart/mixed; boundary=abc"]),
    TOKEN.map(lambda t: f"{t}/{t}"),
)
BODIES = st.one_of(st.binary(max_size=2048), mutated(JPEG), mutated(PNG), st.just(JPEG),
                   st.just(b"\xff\xd8" + b"\0" * (LIMIT + 1)))
QUERY = st.dictionaries(st.sampled_from(["k", "timeout_ms", "priority", "junk"]),
                        st.one_of(st.integers(-10, 10**7).map(str), TOKEN), max_size=3)


@st.composite
def requests(draw):
    method = draw(st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]))
    path = draw(st.one_of(st.sampled_from(["/v1/classify"] * 8 + ["/healthz", "/readyz", "/metrics", "/"]),
                          TOKEN.map(lambda t: "/" + t.lstrip("/"))))  # "//x:y" is a network-path URL, not a path
    headers = {}
    if draw(st.booleans()):
        ctype, body = draw(multipart())
    else:
        ctype, body = draw(CONTENT_TYPES), draw(BODIES)
    if ctype:
        headers["Content-Type"] = ctype
    if draw(st.booleans()):
        headers["X-Request-Id"] = draw(TOKEN)
    if draw(st.booleans()):
        headers["Accept"] = draw(st.sampled_from(["*/*", "application/json", "text/html", "image/*"]))
    return method, path, draw(QUERY), headers, body


def _check(resp):
    assert resp.status_code != 500 and resp.status_code < 600, (resp.status_code, resp.text[:300])
    assert "Traceback" not in resp.text
    if resp.request.method == "HEAD":
        return
    if resp.status_code >= 400:
        doc = resp.json()
        assert doc["error"]["code"] in KNOWN_CODES and doc["error"]["status"] == resp.status_code, doc
        assert isinstance(doc["request_id"], str) and doc["request_id"]
    elif resp.request.url.path == "/v1/classify":
        doc = resp.json()
        assert 1 <= len(doc["top_k"]) <= 5 and all(0.0 <= c["probability"] <= 1.0 for c in doc["top_k"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(req=requests())
def test_fuzz_no_500_and_one_error_schema(client, req):
    method, path, params, headers, body = req
    content = body if method not in ("GET", "HEAD", "OPTIONS") else None
    resp = client.request(method, path, params=params, headers=headers, content=content)
    _check(resp)


def test_fuzz_after_campaign_server_is_healthy(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    r = client.post("/v1/classify", content=JPEG)
    assert r.status_code == 200 and r.json()["top_k"]


@settings(max_examples=60, deadline=None)
@given(junk=st.binary(min_size=1, max_size=300))
def test_fuzz_garbage_on_the_socket_never_gets_a_5xx(server, junk):
    """Bytes that are not HTTP are refused by the protocol layer (400) or time out (408); never a 5xx."""
    with socket.create_connection((server.host, server.port), timeout=5) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\n" + junk + b"\r\n\r\n")
        s.settimeout(3)
        try:
            head = s.recv(200)
        except (TimeoutError, ConnectionResetError):
            head = b""
    if head.startswith(b"HTTP/1.1 "):
        status = int(head.split()[1])
        assert status < 500, head
