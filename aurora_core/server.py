"""``aurora serve``: the reference HTTP server (FastAPI app from ``server_app``, run by uvicorn).

Install with ``pip install aurora_core[serve]``. Lifecycle:

- start: build the Pipeline (it warms every bucket up), bind, then serve; /readyz turns 200 once the
  pipeline reports ready.
- SIGTERM / SIGINT: /readyz turns 503, the listening socket closes, admitted requests finish, the
  pipeline drains and closes, and the process exits 0.
- device fault: /readyz turns 503. With ``--cpu-fallback`` the pipeline moves to the CPU and the
  server keeps serving; without it the server shuts down gracefully and exits with
  ``EXIT_DEVICE_FAULT`` so that a supervisor restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import threading

from aurora_core.cli import number
from aurora_core.server_connections import (
    ConnectionPolicy,
    default_max_connections,
    http_protocol,
    raise_nofile_limit,
)

log = logging.getLogger("aurora_core.server")

EXIT_OK = 0
EXIT_STARTUP = 2        # bad arguments, missing [serve] extra, model that does not load, port in use
EXIT_DEVICE_FAULT = 3   # the device failed and there is no CPU fallback: restart me

_WATCH_PERIOD_S = 0.1


def bind_socket(host: str = "127.0.0.1", port: int = 0, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket; port 0 picks a free port (read it back with ``getsockname()``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when proto says TCP,
    # and without it every response pays a 40 ms delayed-ACK stall (measured: 50 ms -> <2 ms per request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class Server:
    """One pipeline behind HTTP. ``run()`` blocks until shutdown and returns the exit code.

    pipeline: an ``aurora_core.Pipeline`` (owned by the caller unless ``close_pipeline=True``).
    config: ``server_app.ServerConfig``.
    cpu_fallback: whether the pipeline was built with ``cpu_fallback=True``; decides whether a device
        fault ends the process.
    max_connections: open connections, idle keep-alive ones included (default: the soft
        file-descriptor limit less a reserve, see ``server_connections``). Past it the longest-idle
        connection is shed; only when every connection has a request in flight is a new one refused
        (JSON 503 ``too_many_connections``). uvicorn's own cap, with its plain-text 503, sits at twice
        this as a backstop. Requests in flight have their own limit, ``config.max_concurrent_requests``.
    header_timeout_s: a connection must send a request's headers within this of connecting or of
        its previous response (slowloris); ``pressure_header_timeout_s`` when over half the cap is open.
    """

    def __init__(self, pipeline, config=None, *, host: str = "127.0.0.1", port: int = 0,
                 cpu_fallback: bool = False, registry=None, max_connections: int | None = None,
                 keepalive_s: int = 5, header_timeout_s: float = 10.0, pressure_header_timeout_s: float = 1.0,
                 shutdown_timeout_s: float = 30.0, log_level: str = "warning", access_log: bool = False,
                 close_pipeline: bool = False):
        import uvicorn
        from prometheus_client import CollectorRegistry

        from aurora_core.server_app import ServerConfig, create_app

        self.pipeline = pipeline
        self.config = config or ServerConfig()
        self.cpu_fallback = cpu_fallback
        self.close_pipeline = close_pipeline
        registry = registry if registry is not None else CollectorRegistry()
        self.app = create_app(pipeline, self.config, registry=registry)
        self.state = self.app.state.server
        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.exit_code = EXIT_OK
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.max_connections = max_connections or default_max_connections()
        self.connections = ConnectionPolicy(self.max_connections, header_timeout_s, pressure_header_timeout_s,
                                            registry=registry)
        # ws="none": the app has no websocket route, and an upgraded connection would leave the policy's sight.
        uv_config = uvicorn.Config(
            self.app, http=http_protocol(self.connections, _refuse_app(self.config.retry_after_s)),
            ws="none", lifespan="off", log_level=log_level, access_log=access_log,
            limit_concurrency=2 * self.max_connections, timeout_keep_alive=keepalive_s,
            timeout_graceful_shutdown=int(max(1, shutdown_timeout_s)), server_header=False,
        )
        self._uv = _Uvicorn(uv_config, self.state)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (when on the main thread), ``stop()`` or a fatal device fault."""
        # Everything alive now (torch, the model, the app) lives as long as the server: freezing it
        # keeps the cyclic GC from walking it on every full collection. Measured here: a 233 ms gen-2
        # pause in the middle of an overload test, which every request in flight paid.
        gc.collect()
        gc.freeze()
        # uvicorn re-raises the captured signal after a graceful exit; with the default SIGTERM
        # handler that would kill the process (exit 143) after we finished cleanly.
        saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                saved[sig] = signal.signal(sig, _ignore_signal)
        try:
            asyncio.run(self._serve())
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            self.sock.close()
            if self.close_pipeline:
                self.pipeline.close()
        return self.exit_code

    async def _serve(self):
        watch = asyncio.create_task(self._watch())
        sweep = asyncio.create_task(self.connections.run())
        try:
            await self._uv.serve(sockets=[self.sock])
        finally:
            watch.cancel()
            sweep.cancel()
            self._started.set()
        if not self._uv.started:  # uvicorn gave up during startup (it logged why)
            self.exit_code = self.exit_code or EXIT_STARTUP

    async def _watch(self):
        """Device watchdog. The pipeline turns not-ready on a sticky device error: with CPU fallback it
        becomes ready again on the CPU (the probe shows the gap); without it the server ends."""
        while not self._uv.started:
            await asyncio.sleep(_WATCH_PERIOD_S)
        self._started.set()
        was_ready = False
        while not self._uv.should_exit:
            ready = _pipeline_ready(self.pipeline)
            if was_ready and not ready and not self.state.draining:
                if not self.cpu_fallback:
                    log.error("pipeline stopped being ready (device fault) and there is no CPU fallback: "
                              "shutting down with exit %d for a restart", EXIT_DEVICE_FAULT)
                    self.state.fault = "device fault"
                    self.exit_code = EXIT_DEVICE_FAULT
                    self.state.draining = True
                    self._uv.should_exit = True
                    return
                log.error("pipeline not ready (device fault); waiting for its CPU fallback")
            was_ready = was_ready or ready
            await asyncio.sleep(_WATCH_PERIOD_S)

    # -- in a thread (tests, embedding) -------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> Server:
        """Serve on a background thread; returns once the socket accepts connections."""
        self._thread = threading.Thread(target=self._run_thread, name="aurora-http", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout) or not self._uv.started:
            raise RuntimeError(f"aurora server did not start within {timeout} s")
        return self

    def _run_thread(self):
        try:
            self.run()
        except Exception:
            log.exception("aurora server thread failed")
            self.exit_code = self.exit_code or 1

    def stop(self, timeout: float = 60.0) -> int:
        """Graceful stop, as on SIGTERM; returns the exit code."""
        self.state.draining = True
        self._uv.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"aurora server did not stop within {timeout} s")
        return self.exit_code

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the thread to end by itself (e.g. after a device fault); None if still running."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return None
        return self.exit_code

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _ignore_signal(signum, frame):
    pass


def _Uvicorn(config, state):
    """A uvicorn.Server that flips /readyz to 503 the moment a stop signal arrives (built lazily:
    uvicorn is an optional dependency)."""
    import uvicorn

    class _UvicornServer(uvicorn.Server):
        def __init__(self, config, state):
            super().__init__(config)
            self._aurora_state = state

        def handle_exit(self, sig, frame):
            self._aurora_state.draining = True
            super().handle_exit(sig, frame)

    return _UvicornServer(config, state)


def _refuse_app(retry_after_s: int):
    """ASGI app for a connection refused at the cap: the JSON 503 ``too_many_connections``, then close."""
    from aurora_core.server_app import error_response, new_request_id

    async def refuse(scope, receive, send):
        resp = error_response(503, "too_many_connections", "too many open connections, all busy; retry later",
                              new_request_id(), retry_after_s)
        resp.headers["Connection"] = "close"
        await resp(scope, receive, send)

    return refuse


def _pipeline_ready(pipeline) -> bool:
    try:
        return bool(pipeline.ready)
    except Exception:
        return False


# -- the ``aurora serve`` command ----------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("model")
    m.add_argument("--model", default=None,
                   help="torchvision architecture name, or a TorchScript / torch.export file "
                        "(default: the pipeline's default for the device)")
    m.add_argument("--weights", default=None, help="local state_dict file for an architecture name")
    m.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    m.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    m.add_argument("--cpu-fallback", action="store_true",
                   help="on a device fault keep serving on the CPU instead of exiting for a restart")
    m.add_argument("--resize", type=int, default=256)
    m.add_argument("--crop", type=int, default=224)
    m.add_argument("--top-k", type=int, default=5, help="classes computed and returned (clients may ask fewer)")
    m.add_argument("--max-pixels", type=int, default=50_000_000, help="larger images get 413 image_too_large")
    m.add_argument("--fast-gap", type=float, default=4.0,
                   help="JPEGs decode at a DCT scale keeping this many times the resized size (4, 2, 1)")
    m.add_argument("--exact", action="store_true",
                   help="decode JPEGs at full size (within one uint8 level of torchvision's transform)")
    b = parser.add_argument_group("batching")
    b.add_argument("--max-batch-size", type=int, default=16)
    b.add_argument("--max-queue-delay-us", type=int, default=2000)
    b.add_argument("--bucket-sizes", default=None, help="comma-separated padded batch sizes, e.g. 1,4,16")
    b.add_argument("--max-queue-size", type=int, default=256,
                   help="waiting requests past which new ones get 503 + Retry-After")
    s = parser.add_argument_group("http")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-body-bytes", type=int, default=16 << 20)
    s.add_argument("--timeout-s", type=float, default=5.0, help="default deadline of one request (504 after)")
    s.add_argument("--max-timeout-s", type=float, default=30.0, help="cap on a client's timeout_ms")
    s.add_argument("--body-timeout-s", type=float, default=10.0, help="time to receive a whole body (408 after)")
    s.add_argument("--max-concurrent-requests", type=int, default=256,
                   help="classify requests in flight (JSON 503 past it); probes are exempt")
    s.add_argument("--max-connections", type=int, default=None,
                   help="open connections, idle keep-alive ones included; past it the longest-idle one is shed "
                        "(default: the file-descriptor limit less a tenth, at least 256)")
    s.add_argument("--keepalive-s", type=int, default=5)
    s.add_argument("--header-timeout-s", type=float, default=10.0,
                   help="close connections that have not sent a request's headers within this (slowloris)")
    s.add_argument("--pressure-header-timeout-s", type=float, default=1.0,
                   help="the header deadline while over half of --max-connections are open")
    s.add_argument("--shutdown-timeout-s", type=float, default=30.0,
                   help="on SIGTERM, how long admitted requests may take to finish")
    s.add_argument("--retry-after-s", type=int, default=1)
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--access-log", action="store_true")
    t = parser.add_argument_group("telemetry")
    t.add_argument("--telemetry-period-s", type=float, default=1.0,
                   help="hardware sampling period for /metrics (0 turns the sampler off)")
    t.add_argument("--record", default=None, metavar="ROOT",
                   help="record always-on into a store root (ROOT/region=R/host=H/ segments of requests, samples and "
                        "events) for aurora diagnose ROOT; with --ray each replica is a host NODE-SLOT")
    t.add_argument("--record-rotate-s", type=number(gt=0), default=600.0, metavar="S",
                   help="start a new segment every S seconds (default 600)")
    t.add_argument("--record-max-bytes", type=number(int, gt=0), default=None, metavar="B",
                   help="keep this host's store under B bytes, removing its oldest segments (default: no bound)")
    t.add_argument("--record-max-age-s", type=number(gt=0), default=None, metavar="S",
                   help="remove this host's segments older than S seconds (default: keep)")
    t.add_argument("--label", default=os.environ.get("AURORA_LABEL"),
                   help="deployment/version label stored in every segment (default $AURORA_LABEL)")
    t.add_argument("--region", default=os.environ.get("AURORA_REGION"),
                   help="region stored in every segment, its region= partition (default $AURORA_REGION)")
    r = parser.add_argument_group("ray serve (pip install 'aurora_core[ray]'; see README 'Scaling out')")
    r.add_argument("--ray", action="store_true",
                   help="serve as Ray Serve replicas: joins the running Ray cluster (RAY_ADDRESS or a local "
                        "one), or starts a local Ray when none runs")
    n = r.add_mutually_exclusive_group()
    n.add_argument("--replicas", type=_at_least_one, default=1, help="fixed number of replicas")
    n.add_argument("--autoscale", type=_min_max, default=None, metavar="MIN:MAX",
                   help="autoscale between MIN and MAX replicas on ongoing requests")
    r.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else auto)")
    r.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs reserved per replica")
    r.add_argument("--replica-gpus", type=float, default=0.0, help="Ray GPUs reserved per replica")
    r.add_argument("--deploy-timeout-s", type=number(gt=0), default=300.0, metavar="S",
                   help="give up (exit 2) when the replicas are not all running after S seconds, e.g. "
                        "resources the cluster lacks, or a model that does not load")
    r.add_argument("--metrics-sd-dir", default=None, metavar="DIR",
                   help="write one Prometheus file_sd target file per replica here (each replica serves "
                        "its own /metrics on an ephemeral port)")
    r.add_argument("--metrics-host", default=None,
                   help="address the replicas' metrics endpoints bind (default: the node's Ray IP)")


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _min_max(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    if not (sep and lo.isdigit() and hi.isdigit() and int(lo) <= int(hi) and int(hi) >= 1):
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return int(lo), int(hi)


def server_config(args: argparse.Namespace):
    """The ``server_app.ServerConfig`` of ``aurora serve``'s arguments (also each ``--ray`` replica's)."""
    from aurora_core.server_app import ServerConfig

    return ServerConfig(
        max_body_bytes=args.max_body_bytes, request_timeout_s=args.timeout_s,
        max_request_timeout_s=args.max_timeout_s, body_timeout_s=args.body_timeout_s,
        max_concurrent_requests=args.max_concurrent_requests, retry_after_s=args.retry_after_s,
        top_k=args.top_k,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "ray", False):
        try:
            from aurora_core import ray_serve
        except ImportError as e:
            print(f"aurora serve --ray: {e.name} is missing; install with: pip install 'aurora_core[serve,ray]'",
                  file=sys.stderr)
            return EXIT_STARTUP
        return ray_serve.run(args)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        print(f"aurora serve: {e.name} is missing; install the server with: pip install 'aurora_core[serve]'",
              file=sys.stderr)
        return EXIT_STARTUP
    before, nofile = raise_nofile_limit()
    log.info("aurora serve: file-descriptor limit %d%s", nofile, f" (raised from {before})" if nofile != before else "")
    parts = _Parts()
    try:
        config = server_config(args)
        parts.build(args)
        server = Server(parts.pipeline, config, host=args.host, port=args.port, cpu_fallback=args.cpu_fallback,
                        registry=parts.exporter.registry, max_connections=args.max_connections,
                        keepalive_s=args.keepalive_s, header_timeout_s=args.header_timeout_s,
                        pressure_header_timeout_s=args.pressure_header_timeout_s,
                        shutdown_timeout_s=args.shutdown_timeout_s,
                        log_level=args.log_level, access_log=args.access_log)
    except Exception as e:  # a startup failure is one line for the operator, not a trace
        parts.close()
        print(f"aurora serve: cannot start: {e}", file=sys.stderr)
        return EXIT_STARTUP
    log.info("aurora serve: listening on %s (model %s, device %s, up to %d connections, %d requests in flight)",
             server.url, parts.pipeline.model_name, parts.pipeline.device, server.max_connections,
             config.max_concurrent_requests)
    try:
        code = server.run()
    finally:
        parts.close()  # after the server: admitted requests have finished, the pipeline drains
    log.info("aurora serve: stopped (exit %d)", code)
    return code


#: Options that say where and how to record or log, not what is served: outside the deployment fingerprint.
_NOT_DEPLOYMENT = ("record", "record_extra", "record_rotate_s", "record_max_bytes", "record_max_age_s", "label", "region",
                   "host", "port", "log_level", "access_log", "deploy_timeout_s")


def record_meta(args) -> dict:
    """A store segment's description of this server: the deployment is every serving option; the load is
    whatever clients send, so the server declares no load keys (diagnose measures the arrivals)."""
    deployment = {k: v for k, v in vars(args).items() if k not in _NOT_DEPLOYMENT}
    meta = {"tool": "aurora serve", "model": str(args.model), "config": deployment, "deployment": deployment,
            "load": {}, "label": args.label, "region": args.region,
            **(getattr(args, "record_extra", None) or {})}  # e.g. a Ray replica's host, node and replica id
    return {k: v for k, v in meta.items() if v is not None}


class _Parts:
    """What ``aurora serve`` builds around the server: the pipeline, the Prometheus exporter (the
    pipeline's sink and the sampler's callback), the telemetry sampler and an optional run file."""

    def __init__(self):
        self.pipeline = self.exporter = self.sampler = self.recorder = None

    def build(self, args) -> None:
        from aurora_core.batching import BatchingConfig
        from aurora_core.export.prometheus import PrometheusExporter
        from aurora_core.ops.preprocess import PreprocessSpec
        from aurora_core.pipeline import Pipeline

        buckets = tuple(int(b) for b in args.bucket_sizes.split(",")) if args.bucket_sizes else None
        batching = BatchingConfig(max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
                                  bucket_sizes=buckets, max_queue_size=args.max_queue_size)
        self.exporter = PrometheusExporter(model=os.path.basename(str(args.model or "default")))
        sinks = [self.exporter]
        if args.record:
            from aurora_core.recorder import Recorder

            self.recorder = Recorder(
                store=args.record, meta=record_meta(args), rotate_s=args.record_rotate_s,
                max_bytes=args.record_max_bytes, max_age_s=args.record_max_age_s)
            sinks.append(self.recorder)
        kwargs = {"weights": args.weights} if args.weights else {}
        self.pipeline = Pipeline(model=args.model, spec=PreprocessSpec(resize=args.resize, crop=args.crop),
                                 batching=batching, device=args.device, dtype=args.dtype, top_k=args.top_k,
                                 sink=sinks, cpu_fallback=args.cpu_fallback,
                                 decode_limits={"max_pixels": args.max_pixels}, fast_decode=not args.exact,
                                 fast_gap=args.fast_gap, **kwargs)
        self.exporter.model = os.path.basename(self.pipeline.model_name)  # the label dashboards group by
        if args.telemetry_period_s > 0:
            from aurora_core.telemetry.sampler import TelemetrySampler

            callbacks = [self.exporter] + ([self.recorder.add_sample] if self.recorder else [])
            events = [self.exporter] + ([self.recorder.add_event] if self.recorder else [])
            self.sampler = TelemetrySampler(callbacks=callbacks, event_callbacks=events,
                                            period_s=args.telemetry_period_s).start()

    def close(self) -> None:
        for part in (self.pipeline, self.sampler, self.recorder):
            if part is None:
                continue
            try:
                part.close() if hasattr(part, "close") else part.stop()
            except Exception:  # shutting down: report, and still close the rest
                log.exception("aurora serve: error while closing %s", type(part).__name__)
