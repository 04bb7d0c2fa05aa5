"""The reference HTTP server over a real loopback socket: round trip, every error code, probes,
device faults and graceful SIGTERM. Load, soak and fuzz tests live in test_server_{overload,soak,fuzz}.py
and reuse the helpers at the top of this file.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from aurora_core.batching import BatchingConfig  # noqa: E402
from aurora_core.ops.preprocess import PreprocessSpec  # noqa: E402
from aurora_core.pipeline import Pipeline  # noqa: E402
from aurora_core.samples import sample_bytes  # noqa: E402
from aurora_core.server import EXIT_DEVICE_FAULT, EXIT_STARTUP, Server, add_arguments, run  # noqa: E402
from aurora_core.server_app import SERVER_CODES, ServerConfig  # noqa: E402

SPEC = PreprocessSpec(resize=32, crop=32)
KNOWN_CODES = set(SERVER_CODES) | {"image_error", "unsupported_format", "corrupt_image", "image_too_large", "overloaded",
                                   "deadline_exceeded", "device_lost", "resource_exhausted", "pipeline_closed"}


# ---------------------------------------------------------------------------------------------------
# helpers shared by the server test files
# ---------------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """Pool + linear over 10 classes: microseconds per batch, so the HTTP stack is what gets tested.
    row_delay_s: sleep per row of the (padded) batch, GIL released: a model whose capacity,
    1 / row_delay_s requests/s, does not depend on how well batches fill.
    gate: a threading.Event every forward waits on (a model held still by the test).
    fail: raise a plain RuntimeError (an unexpected model failure)."""

    def __init__(self, row_delay_s: float = 0.0, gate: threading.Event | None = None, fail: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Linear(48, 10)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(10, 48, generator=g))
        self.row_delay_s, self.gate, self.fail = row_delay_s, gate, fail
        self.armed = False  # warm-up runs at construction; failures and gates apply once armed

    def forward(self, x):
        if self.armed:
            if self.gate is not None:
                self.gate.wait(30)
            if self.fail:
                raise RuntimeError("model exploded: secret internal detail")
        if self.row_delay_s:
            time.sleep(self.row_delay_s * x.shape[0])
        return self.fc(self.pool(x).flatten(1))


def make_jpeg(seed: int, w: int = 64, h: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_png(seed: int, w: int = 40, h: int = 30) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def make_pipeline(model=None, **kw) -> Pipeline:
    kw.setdefault("batching", BatchingConfig(max_batch_size=8, max_queue_delay_us=1000, max_queue_size=64))
    kw.setdefault("num_workers", 2)
    return Pipeline(model if model is not None else TinyNet(), spec=SPEC, device="cpu", **kw)


def raw_exchange(host: str, port: int, data: bytes, timeout: float = 10.0, shut_write: bool = False) -> bytes:
    """Send raw bytes on a fresh connection; return everything the server sends until it closes or
    one full response (by Content-Length) has arrived."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        buf = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            buf += chunk
            head, sep, body = buf.partition(b"\r\n\r\n")
            m = re.search(rb"content-length: *(\d+)", head, re.I)
            if sep and m and len(body) >= int(m.group(1)):
                break
        return buf


def parse_raw(resp: bytes) -> tuple[int, dict, bytes]:
    head, _, body = resp.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


async def post_async(host: str, port: int, body: bytes, *, path: str = "/v1/classify",
                     content_type: str = "image/jpeg", timeout: float = 30.0) -> tuple[int, bytes]:
    """One POST on a fresh connection with asyncio streams: a load-generator client cheap enough
    that the server, not the client, is what saturates. Returns (status, body)."""
    async def go():
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n" % (path.encode(), content_type.encode(), len(body)) + body)
            await writer.drain()
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            data = await reader.readexactly(length) if length else b""
            return int(status_line.split()[1]), data
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout)


class KeepAlivePool:
    """asyncio HTTP/1.1 client over reused connections (one request per connection at a time): a
    load generator cheap enough that the server, not the client, is what saturates."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.idle: list = []

    async def post(self, body: bytes, *, path: str = "/v1/classify", content_type: str = "image/jpeg",
                   timeout: float = 30.0) -> tuple[int, bytes]:
        return await asyncio.wait_for(self._post(body, path, content_type), timeout)

    async def _post(self, body, path, content_type):
        while True:
            reused = bool(self.idle)
            reader, writer = self.idle.pop() if reused else await asyncio.open_connection(self.host, self.port)
            try:
                writer.write(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
                             % (path.encode(), content_type.encode(), len(body)) + body)
                await writer.drain()
                status_line = await reader.readline()
                if not status_line and reused:  # the server closed an idle keep-alive connection
                    writer.close()
                    continue
                length, close = 0, False
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    k, _, v = line.partition(b":")
                    k = k.strip().lower()
                    if k == b"content-length":
                        length = int(v)
                    elif k == b"connection" and v.strip().lower() == b"close":
                        close = True
                data = await reader.readexactly(length) if length else b""
            except BaseException:
                writer.close()
                raise
            if close:
                writer.close()
            else:
                self.idle.append((reader, writer))
            return int(status_line.split()[1]), data

    def close(self):
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def error_of(resp) -> dict:
    """The JSON error body of an httpx response, checked against the one schema."""
    doc = resp.json()
    assert set(doc) == {"request_id", "error"}, doc
    err = doc["error"]
    assert set(err) == {"code", "reason", "status", "message"}, err
    assert err["status"] == resp.status_code
    assert err["code"] in KNOWN_CODES, err
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    return err


# ---------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    with make_pipeline(decode_limits={"max_pixels": 1_000_000}) as p:
        yield p


@pytest.fixture(scope="module")
def server(pipe):
    config = ServerConfig(max_body_bytes=1 << 20, body_timeout_s=0.5, request_timeout_s=5.0)
    srv = Server(pipe, config).start()
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


# ---------------------------------------------------------------------------------------------------
# round trip
# ---------------------------------------------------------------------------------------------------
ROUNDTRIP_INPUTS = {
    "jpeg_small": lambda: make_jpeg(1),
    "jpeg_odd": lambda: make_jpeg(2, w=17, h=5),
    "png_small": lambda: make_png(3),
    "photo_0.3mp": lambda: sample_bytes("0.3mp"),
    "photo_png": lambda: sample_bytes("coffee_png"),
}


@pytest.mark.parametrize("name", sorted(ROUNDTRIP_INPUTS))
def test_roundtrip_top_k_equals_pipeline(name, client, pipe):
    data = ROUNDTRIP_INPUTS[name]()
    expected = pipe.infer(data).top_k
    r = client.post("/v1/classify", content=data, headers={"Content-Type": "application/octet-stream",
                                                            "X-Request-Id": "req-" + name})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["request_id"] == "req-" + name == r.headers["x-request-id"]
    got = [(c["class_index"], c["probability"]) for c in doc["top_k"]]
    assert [c for c, _ in got] == [c for c, _ in expected]
    # Same model, same preprocessing; batch composition may differ, so allow float32 noise only.
    np.testing.assert_allclose([p for _, p in got], [float(p) for _, p in expected], rtol=1e-5, atol=1e-6)
    t = doc["timings"]
    assert t["batch_size"] >= 1 and t["device"] == "cpu"
    assert 0 <= t["compute_ms"] <= t["total_ms"] <= t["server_total_ms"]


def test_multipart_equals_raw_and_k_limits(client, pipe):
    data = make_jpeg(7)
    expected = [c for c, _ in pipe.infer(data).top_k]
    r = client.post("/v1/classify", files={"image": ("x.jpg", data, "image/jpeg")}, data={"note": "hi"})
    assert r.status_code == 200, r.text
    assert [c["class_index"] for c in r.json()["top_k"]] == expected
    r = client.post("/v1/classify?k=2", files={"upload": ("x.jpg", data, "image/jpeg")})  # first file part
    assert r.status_code == 200, r.text
    assert [c["class_index"] for c in r.json()["top_k"]] == expected[:2]
    r = client.post("/v1/classify?priority=1&timeout_ms=4000", content=data, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200
    assert re.fullmatch(r"[0-9a-f]{22}", r.json()["request_id"])  # generated when the client sends none


def test_request_id_that_is_not_safe_is_replaced(client):
    r = client.post("/v1/classify", content=b"", headers={"X-Request-Id": "bad id\twith spaces"})
    assert r.json()["request_id"] != "bad id\twith spaces"


# ---------------------------------------------------------------------------------------------------
# probes, metrics, OpenAPI
# ---------------------------------------------------------------------------------------------------
def test_probes_metrics_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").status_code == 200
    client.post("/v1/classify", content=make_jpeg(3))
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    assert re.search(r'aurora_http_requests_total\{route="/v1/classify",status="200"\} [1-9]', m.text)
    assert "aurora_server_ready 1.0" in m.text
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/v1/classify"]["post"]
    assert {"image/jpeg", "image/png", "application/octet-stream", "multipart/form-data"} <= set(
        op["requestBody"]["content"])
    assert {"200", "400", "413", "415", "422", "503", "504", "500"} <= set(op["responses"])
    assert {"/healthz", "/readyz", "/metrics"} <= set(spec["paths"])


# ---------------------------------------------------------------------------------------------------
# every error code from real bad requests
# ---------------------------------------------------------------------------------------------------
def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> tuple[bytes, str]:
    out = b""
    for name, filename, data in parts:
        fn = f'; filename="{filename}"' if filename else ""
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{fn}\r\n\r\n'.encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _bad_requests():
    jpeg = make_jpeg(5)
    only_text, only_text_ct = _multipart([("note", None, b"hello")])
    gif = b"GIF89a" + b"\x00" * 64
    return {
        "empty_body": (400, "empty_body", dict(content=b"")),
        "multipart_truncated": (400, "malformed_multipart",
                                dict(content=b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nabc",
                                     headers={"Content-Type": "multipart/form-data; boundary=XyZ"})),
        "multipart_no_boundary": (400, "malformed_multipart",
                                  dict(content=b"abc", headers={"Content-Type": "multipart/form-data"})),
        "multipart_no_image": (400, "missing_image", dict(content=only_text, headers={"Content-Type": only_text_ct})),
        "bad_query": (400, "malformed_request", dict(content=jpeg, params={"k": "many"})),
        "bad_priority": (400, "malformed_request", dict(content=jpeg, params={"priority": "7"})),
        "body_too_large": (413, "body_too_large", dict(content=b"\xff\xd8" + b"\0" * (1100 << 10))),
        "pixels_too_many": (413, "image_too_large", dict(content=sample_bytes("2.5mp"))),
        "text_content_type": (415, "unsupported_media_type",
                              dict(content=jpeg, headers={"Content-Type": "text/plain"})),
        "gif_bytes": (415, "unsupported_format", dict(content=gif, headers={"Content-Type": "image/gif"})),
        "truncated_jpeg": (422, "corrupt_image", dict(content=jpeg[: len(jpeg) // 2])),
        "garbage_after_jpeg_magic": (422, "corrupt_image", dict(content=b"\xff\xd8\xff" + b"\x13" * 500)),
    }


@pytest.mark.parametrize("case", sorted(_bad_requests()))
def test_error_codes_from_bad_requests(case, client):
    status, code, kwargs = _bad_requests()[case]
    r = client.post("/v1/classify", **kwargs)
    assert r.status_code == status, r.text
    assert error_of(r)["code"] == code


def test_not_found_and_method_not_allowed_are_json(client):
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = client.get("/v1/classify")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


def test_413_from_content_length_before_the_body_is_sent(server):
    # Only the headers go out: the answer must come without the server waiting for 10 MB.
    resp = raw_exchange(server.host, server.port,
                        b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n")
    status, headers, body = parse_raw(resp)
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"


def test_413_while_streaming_a_chunked_body(server):
    chunk = b"%x\r\n%s\r\n" % (64 << 10, b"a" * (64 << 10))
    # 20 x 64 KiB > 1 MiB, without a Content-Length to check up front.
    resp = raw_exchange(server.host, server.port,
                        b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 20)
    status, _, body = parse_raw(resp)
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"


def test_408_slow_body_does_not_block_others(server, client):
    """A client that stalls mid-body gets 408 after body_timeout_s; meanwhile others are served."""
    out = {}

    def slow():
        out["resp"] = raw_exchange(server.host, server.port,
                                   b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n\xff\xd8")

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.05)
    fast = [client.post("/v1/classify", content=make_jpeg(i)).status_code for i in range(5)]
    t.join(10)
    assert fast == [200] * 5
    status, _, body = parse_raw(out["resp"])
    assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout"


def test_a_body_trickled_within_the_deadline_is_served(server):
    data = make_jpeg(11)
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(data))
        step = len(data) // 8 + 1
        for i in range(0, len(data), step):  # 8 pieces over ~0.16 s, within body_timeout_s = 0.5
            s.sendall(data[i:i + step])
            time.sleep(0.02)
        buf = b""
        while b"top_k" not in buf or not buf.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    status, _, body = parse_raw(buf)
    assert status == 200 and json.loads(body)["top_k"]


def test_slowloris_headers_are_cut_off_but_slow_answers_are_not():
    gate = threading.Event()
    net = TinyNet(gate=gate)
    with make_pipeline(net) as p:
        net.armed = True
        srv = Server(p, ServerConfig(), header_timeout_s=0.5, max_connections=10).start()
        try:
            with httpx.Client(base_url=srv.url, timeout=30) as c, ThreadPoolExecutor(1) as ex:
                answer = ex.submit(c.post, "/v1/classify", content=make_jpeg(1))  # held by the gate for ~1 s
                slow = [socket.create_connection((srv.host, srv.port)) for _ in range(6)]
                for s_ in slow:
                    s_.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: t\r\n")
                time.sleep(0.3)
                for s_ in slow:  # one more byte: uvicorn's own idle timer would restart here
                    s_.sendall(b"X")
                time.sleep(0.7)
                gate.set()
                assert answer.result().status_code == 200  # headers were complete: not cut
                for s_ in slow:
                    s_.settimeout(5)
                    assert s_.recv(100) == b""  # closed without an answer
                    s_.close()
                # Their connection slots are free again.
                with ThreadPoolExecutor(8) as ex8:
                    codes = list(ex8.map(lambda i: httpx.post(srv.url + "/v1/classify", content=make_jpeg(i),
                                                              timeout=30).status_code, range(8)))
                assert codes == [200] * 8
        finally:
            gate.set()
            srv.stop()


def test_503_overloaded_with_retry_after_and_exact_counts():
    gate = threading.Event()
    net = TinyNet(gate=gate)
    batching = BatchingConfig(max_batch_size=1, max_queue_delay_us=0, max_queue_size=2)
    with make_pipeline(net, batching=batching) as p:
        net.armed = True
        srv = Server(p, ServerConfig(retry_after_s=2)).start()
        try:
            with httpx.Client(base_url=srv.url, timeout=30) as c, ThreadPoolExecutor(10) as ex:
                futs = [ex.submit(c.post, "/v1/classify", content=make_jpeg(i)) for i in range(10)]
                # At most 1 computing + 1 prepared + 1 forming + 2 queued are admitted: >= 5 rejected at once.
                deadline = time.monotonic() + 10
                while sum(f.done() for f in futs) < 5 and time.monotonic() < deadline:
                    time.sleep(0.01)
                rejected = [f.result() for f in futs if f.done()]
                assert len(rejected) >= 5
                for r in rejected:
                    assert r.status_code == 503 and r.headers["retry-after"] == "2"
                    assert error_of(r)["code"] == "overloaded"
                gate.set()
                codes = [f.result().status_code for f in futs]
                assert codes.count(200) + codes.count(503) == 10 and codes.count(200) >= 1
                assert p.stats()["completed"] == codes.count(200)
        finally:
            gate.set()
            srv.stop()


def test_504_when_the_deadline_passes_in_the_queue():
    gate = threading.Event()
    net = TinyNet(gate=gate)
    with make_pipeline(net, batching=BatchingConfig(max_batch_size=1, max_queue_delay_us=0, max_queue_size=16)) as p:
        net.armed = True
        srv = Server(p, ServerConfig()).start()
        try:
            with httpx.Client(base_url=srv.url, timeout=30) as c, ThreadPoolExecutor(4) as ex:
                blockers = [ex.submit(c.post, "/v1/classify", content=make_jpeg(i)) for i in range(3)]
                time.sleep(0.2)
                t0 = time.monotonic()
                late = ex.submit(c.post, "/v1/classify", params={"timeout_ms": 100}, content=make_jpeg(8))
                time.sleep(0.4)
                gate.set()
                r = late.result()
                assert r.status_code == 504, r.text
                assert error_of(r)["code"] == "deadline_exceeded"
                assert time.monotonic() - t0 < 5
                assert [b.result().status_code for b in blockers] == [200] * 3
        finally:
            gate.set()
            srv.stop()


def test_500_for_an_unexpected_model_failure_leaks_nothing():
    net = TinyNet(fail=True)
    with make_pipeline(net) as p:
        net.armed = True
        with Server(p, ServerConfig()) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.post("/v1/classify", content=make_jpeg(1))
            assert r.status_code == 500
            assert error_of(r)["code"] == "internal_error"
            assert "secret" not in r.text and "exploded" not in r.text
            assert c.get("/healthz").status_code == 200


def test_503_too_many_concurrent_requests_probes_exempt():
    gate = threading.Event()
    net = TinyNet(gate=gate)
    with make_pipeline(net) as p:
        net.armed = True
        srv = Server(p, ServerConfig(max_concurrent_requests=2)).start()
        try:
            with httpx.Client(base_url=srv.url, timeout=30) as c, ThreadPoolExecutor(2) as ex:
                held = [ex.submit(c.post, "/v1/classify", content=make_jpeg(i)) for i in range(2)]
                deadline = time.monotonic() + 10
                while srv.state.in_flight < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                r = c.post("/v1/classify", content=make_jpeg(3))
                assert r.status_code == 503 and "retry-after" in r.headers
                assert error_of(r)["code"] == "too_many_requests"
                assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
                gate.set()
                assert [f.result().status_code for f in held] == [200, 200]
        finally:
            gate.set()
            srv.stop()


def _wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def _closed_by_server(s: socket.socket, timeout: float = 0.0) -> bool:
    """True when the server closed the connection (EOF readable within timeout)."""
    if timeout:
        s.settimeout(timeout)
    else:
        s.setblocking(False)
    try:
        return s.recv(1) == b""
    except (BlockingIOError, TimeoutError):
        return False
    except ConnectionResetError:
        return True
    finally:
        s.setblocking(True)


def _shed(metrics: str) -> dict[str, int]:
    return {r: int(float(v)) for r, v in re.findall(r'aurora_http_connections_shed_total\{reason="(\w+)"\} ([0-9.e+]+)',
                                                    metrics)}


def _keepalive_get(s: socket.socket, path: str = "/healthz") -> int:
    s.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    status, headers, body = parse_raw(buf)
    while len(body) < int(headers["content-length"]):
        body += s.recv(4096)
    return status


def test_at_the_cap_the_longest_idle_connection_is_shed_not_the_new_one(pipe):
    """The old server answered the new connection's request with 503 too_many_connections."""
    with Server(pipe, ServerConfig(max_concurrent_requests=2), max_connections=4,
                pressure_header_timeout_s=8) as srv:
        conns = []
        for _ in range(4):  # opened in order: 0 is the oldest
            conns.append(socket.create_connection((srv.host, srv.port)))
            assert _wait_for(lambda: len(srv.connections.open) == len(conns))
        try:
            # A request on 0 makes it the most recently idle: 1 is now the longest idle.
            assert _keepalive_get(conns[0]) == 200
            assert _wait_for(lambda: len(srv.connections.idle) == 4)
            status, _, body = parse_raw(raw_exchange(
                srv.host, srv.port, b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(make_jpeg(1)) + make_jpeg(1)))
            assert status == 200 and json.loads(body)["top_k"]
            assert _closed_by_server(conns[1], timeout=5)
            assert not any(_closed_by_server(c) for c in (conns[0], conns[2], conns[3]))
            assert _keepalive_get(conns[0]) == 200  # the survivors still serve
            m = httpx.get(srv.url + "/metrics", timeout=10).text
            assert _shed(m)["at_cap"] == 1 and _shed(m)["refused"] == 0, _shed(m)
            assert "aurora_http_connections_limit 4.0" in m
            assert re.search(r"^aurora_http_connections [1-4]\.0$", m, re.M)
        finally:
            for c in conns:
                c.close()


def test_at_the_cap_with_every_connection_busy_the_new_one_gets_json_503(pipe):
    gate = threading.Event()
    net = TinyNet(gate=gate)
    with make_pipeline(net) as p:
        net.armed = True
        srv = Server(p, ServerConfig(), max_connections=2).start()
        try:
            with ThreadPoolExecutor(2) as ex:
                held = [ex.submit(httpx.post, srv.url + "/v1/classify", content=make_jpeg(i), timeout=30)
                        for i in range(2)]
                assert _wait_for(lambda: srv.state.in_flight == 2)
                status, headers, body = parse_raw(raw_exchange(
                    srv.host, srv.port, b"POST /v1/classify HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n"))
                assert status == 503 and headers["connection"] == "close" and "retry-after" in headers
                assert json.loads(body)["error"]["code"] == "too_many_connections"
                gate.set()
                assert [f.result().status_code for f in held] == [200, 200]
            assert srv.connections.shed["refused"] == 1
            assert _wait_for(lambda: not srv.connections.open)
            assert httpx.post(srv.url + "/v1/classify", content=make_jpeg(1), timeout=30).status_code == 200
        finally:
            gate.set()
            srv.stop()


def test_header_deadline_shortens_under_pressure(pipe):
    """Over half the cap open: connections without headers are closed after the pressure deadline,
    oldest first, until half the cap is open; the rest keep the (long) quiet-time deadline."""
    with Server(pipe, ServerConfig(), max_connections=4, header_timeout_s=30, pressure_header_timeout_s=0.3) as srv:
        quiet = socket.create_connection((srv.host, srv.port))
        quiet.sendall(b"GET /healthz HTTP/1.1\r\n")  # a request line, then nothing
        time.sleep(0.6)
        assert not _closed_by_server(quiet)  # 1 of 4 open: no pressure
        flood = []
        for _ in range(3):
            flood.append(socket.create_connection((srv.host, srv.port)))
            assert _wait_for(lambda: len(srv.connections.idle) == 1 + len(flood))
        try:
            assert _closed_by_server(quiet, timeout=5) and _closed_by_server(flood[0], timeout=5)
            time.sleep(0.6)
            assert not _closed_by_server(flood[1]) and not _closed_by_server(flood[2])  # 2 of 4: no pressure
            assert srv.connections.shed == {"at_cap": 0, "pressure": 2, "header_timeout": 0, "refused": 0}
            assert _keepalive_get(flood[1]) == 200
        finally:
            for c in [quiet] + flood:
                c.close()


class _Conn:
    """What ConnectionPolicy needs of a connection: a way to close it."""

    def __init__(self, name):
        self.name, self.closed = name, False

    def shed(self):
        self.closed = True


def test_connection_policy_sheds_longest_idle_never_busy_and_bounds_each_sweep():
    from aurora_core import server_connections as sc

    pol = sc.ConnectionPolicy(max_connections=3, header_timeout_s=10, pressure_header_timeout_s=1)
    a, b, c, d, e = (_Conn(n) for n in "abcde")
    assert pol.opened(a, 0.0) and pol.opened(b, 0.1) and pol.opened(c, 0.2)
    pol.update(a, True, 0.3)     # a request in flight on a
    pol.update(b, True, 0.3)
    pol.update(b, False, 0.4)    # b answered: idle since 0.4, now younger than c
    assert pol.opened(d, 0.5) and c.closed and not (a.closed or b.closed)
    assert pol.shed["at_cap"] == 1 and len(pol.open) == 3
    pol.update(b, True, 0.6)
    pol.update(d, True, 0.6)     # every connection busy: the next one is refused, nothing is shed
    assert not pol.opened(e, 0.7) and pol.shed["refused"] == 1 and not any(x.closed for x in (a, b, d))
    pol.sweep(0.8)
    assert not e.closed          # under pressure, but e is not past the 1 s deadline yet
    pol.sweep(1.8)
    assert e.closed and pol.shed["pressure"] == 1 and not any(x.closed for x in (a, b, d))

    big = sc.ConnectionPolicy(max_connections=100_000, header_timeout_s=1)
    conns = [_Conn(i) for i in range(sc._MAX_CLOSES_PER_SWEEP + 10)]
    for i, x in enumerate(conns):
        big.opened(x, i * 1e-6)
    big.sweep(5.0)               # all past the deadline: one sweep closes a bounded number, oldest first
    assert [x.closed for x in conns] == [True] * sc._MAX_CLOSES_PER_SWEEP + [False] * 10
    big.sweep(5.05)
    assert all(x.closed for x in conns) and big.shed["header_timeout"] == len(conns) and not big.open


def test_connection_cap_defaults_to_the_descriptor_limit_not_the_request_limit(pipe):
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    with Server(pipe, ServerConfig(max_concurrent_requests=8)) as srv:
        assert srv.max_connections == max(16, soft - max(256, soft // 10))
        assert srv.connections.max_connections == srv.max_connections


def test_raise_nofile_limit_lifts_the_soft_limit_to_the_hard_one():
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 512:
        pytest.skip(f"hard RLIMIT_NOFILE {hard}: nothing to raise to")
    code = ("import resource; from aurora_core.server_connections import raise_nofile_limit as r; "
            "print(r(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard)),
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == ["(512,", f"{hard})", str(hard)], out


# ---------------------------------------------------------------------------------------------------
# device faults
# ---------------------------------------------------------------------------------------------------
def test_device_fault_without_fallback_fails_readiness_and_exits_nonzero():
    p = make_pipeline()
    srv = Server(p, ServerConfig(), cpu_fallback=False, close_pipeline=True).start()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/readyz").status_code == 200
        p.runner.inject_fault("sticky")
        r = c.post("/v1/classify", content=make_jpeg(1))
        assert r.status_code == 503 and error_of(r)["code"] == "device_lost"
        # The pipeline marks itself down just after failing the batch, on its own thread.
        deadline = time.monotonic() + 10
        while srv.state.is_ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not srv.state.is_ready()
    assert srv.wait(timeout=15) == EXIT_DEVICE_FAULT
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/healthz", timeout=2)


def test_device_fault_with_cpu_fallback_keeps_serving():
    with make_pipeline(cpu_fallback=True) as p:
        with Server(p, ServerConfig(), cpu_fallback=True) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
            p.runner.inject_fault("sticky")
            r = c.post("/v1/classify", content=make_jpeg(1))
            assert r.status_code == 503 and error_of(r)["code"] == "device_lost"
            deadline = time.monotonic() + 10
            while c.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [c.post("/v1/classify", content=make_jpeg(i)).status_code for i in range(5)] == [200] * 5
            time.sleep(0.3)  # a few watchdog periods: it must not have shut the server down
            assert srv.wait(timeout=0) is None
            assert c.get("/readyz").status_code == 200


# ---------------------------------------------------------------------------------------------------
# the command: startup failures and graceful SIGTERM in a real process
# ---------------------------------------------------------------------------------------------------
def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_startup_failure_is_one_line_and_exit_2(capsys):
    assert run(_parse(["--model", "no_such_architecture", "--port", "0", "--log-level", "error"])) == EXIT_STARTUP
    err = capsys.readouterr().err
    assert "cannot start" in err and "Traceback" not in err


def test_sigterm_finishes_admitted_requests_then_exits_zero(tmp_path):
    model = tmp_path / "tiny.pt2"
    exported = torch.export.export(TinyNet().eval(), (torch.zeros(2, 3, 32, 32),),
                                   dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}})
    torch.export.save(exported, str(model))
    # A 1.5 s batching delay keeps requests admitted-but-waiting while SIGTERM arrives.
    cmd = [sys.executable, "-m", "aurora_core.cli", "serve", "--model", str(model), "--resize", "32", "--crop", "32",
           "--device", "cpu", "--port", "0", "--max-batch-size", "8", "--max-queue-delay-us", "1500000",
           "--log-level", "info", "--telemetry-period-s", "0.2", "--record", str(tmp_path / "run")]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        url, startup = None, []
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            startup.append(line)
            m = re.search(r"listening on (http://\S+)", line)
            url = m.group(1) if m else None
        assert url, "server did not report its address"
        # The descriptor limit it runs under (the soft one raised to the hard one), and its two caps.
        import resource

        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        assert any(f"file-descriptor limit {nofile}" in ln for ln in startup), startup
        assert re.search(r"up to \d+ connections, 256 requests in flight", startup[-1]), startup
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/readyz").status_code == 200
            time.sleep(0.5)  # a few telemetry periods
            metrics = c.get("/metrics").text
            # Pipeline (Triton-named), telemetry and HTTP metrics share one registry.
            assert "nv_inference_pending_request_count" in metrics or "nv_inference_request_success" in metrics
            assert "nv_cpu_utilization" in metrics and "aurora_http_requests_total" in metrics
            with ThreadPoolExecutor(4) as ex:
                futs = [ex.submit(c.post, "/v1/classify", content=make_jpeg(i)) for i in range(4)]
                time.sleep(0.4)
                assert not any(f.done() for f in futs)
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.4)
                # Stopped accepting: a new connection is refused while the admitted work still runs.
                with pytest.raises(httpx.ConnectError):
                    httpx.get(url + "/healthz", timeout=2)
                assert [f.result().status_code for f in futs] == [200] * 4
        assert proc.wait(timeout=30) == 0
        # --record is a store: a clean exit leaves closed (Parquet) segments only.
        segs = list((tmp_path / "run").glob("region=*/host=*/*.requests.*"))
        assert segs and all(p.suffix == ".parquet" for p in segs), segs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
