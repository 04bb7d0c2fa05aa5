"""``aurora serve --ray``: the same HTTP API as ``aurora serve``, as Ray Serve replicas.

Install with ``pip install 'aurora_core[serve,ray]'``. Each replica builds one ``Pipeline`` (the same
``server._Parts`` as ``aurora serve``: pipeline, Prometheus exporter, telemetry sampler, run file) and
serves ``server_app.create_app``'s FastAPI app through ``@serve.ingress``, so routes, limits, error
bodies and status codes are the server's own. aurora's batcher batches; there is no ``@serve.batch``.

- Ray's proxy admits; every request reaches one replica's app, whose pipeline queue answers 503
  ``overloaded`` as it does behind uvicorn. ``max_ongoing_requests`` is set to the server's
  ``max_concurrent_requests`` so that Ray's router does not cap the batcher's batch size (Ray's
  default of 5 in flight would).
- Health: ``check_health`` raises while ``pipe.ready`` is false (a device fault), and Ray replaces
  the replica.
- Downscale / redeploy: Ray stops routing to the replica and waits for its ongoing requests
  (``graceful_shutdown_timeout_s``); then ``__del__`` turns /readyz to 503 and closes the pipeline,
  which still serves anything queued, then the sampler and the run file.
- Recording: each replica records always-on into the store under ``ROOT/region=R/host=NODE-SLOT/``
  (``replica_host``; SLOT is Ray's rank of the replica on its node, usually reused by the replica that
  replaces it), with ``node``, ``slot`` and the unique ``replica`` id in the segments' meta.
- Prometheus: each replica serves its own registry on its own port (``metrics_target``), listed for
  Prometheus' ``file_sd_configs`` in ``--metrics-sd-dir``. Why not Ray's metrics agent: aurora's
  metrics are prometheus_client objects (histogram buckets, gauges that read the pipeline on scrape);
  the agent takes only ``ray.util.metrics`` objects, so every metric would be defined twice, and a
  scrape of /metrics through Ray's proxy reaches one replica chosen by the router, not a given one.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time

import ray
from ray import serve

from aurora_core.server import EXIT_OK, EXIT_STARTUP, _Parts, server_config
from aurora_core.server_app import _request_id, create_app, error_response

log = logging.getLogger("aurora_core.ray_serve")

APP_NAME = "aurora"

def autoscaling_preset(min_replicas: int, max_replicas: int, max_batch_size: int = 16) -> dict:
    """Ray's ``autoscaling_config`` on its count of ongoing requests per replica. One replica keeps its
    batcher fed with about two full batches in flight; Ray adds replicas after 10 s above that and removes
    them after a quiet minute. To scale on aurora's queue time instead, see README "Scaling out"."""
    return {
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "target_ongoing_requests": 2 * max_batch_size,
        "upscale_delay_s": 10.0,
        "downscale_delay_s": 60.0,
        "metrics_interval_s": 2.0,
        "look_back_period_s": 10.0,
    }


def replica_host(node: str, slot: int) -> str:
    """The store host a replica records as: ``ROOT/region=R/host=NODE-SLOT/``. SLOT is Ray's rank of the
    replica among the deployment's replicas on its node (``ReplicaRank.local_rank``): no two live replicas
    share it (one writer per host directory), and a replica that replaces another (restart, autoscaling,
    a rollout) takes the freed one. So a node holds at most as many host directories as it ever ran
    replicas at once, per-host retention reaches a dead replica's segments, and a rollout's old and new
    versions follow one another under one host (what diagnose's deployment detection compares)."""
    return f"{node}-{slot}"


def _slot(rank) -> int:
    # Ray 2.60's ReplicaContext.rank is a ReplicaRank (rank, node_rank, local_rank).
    return int(getattr(rank, "local_rank", rank) or 0)


@serve.deployment
@serve.ingress()
class AuroraReplica:
    """One Pipeline behind the server's FastAPI app. args: ``aurora serve``'s parsed arguments."""

    def __init__(self, args: argparse.Namespace, region: str = "local"):
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_tag
        self.host = socket.gethostname()
        self.slot = _slot(ctx.rank)
        self.region = region
        self.config = server_config(args)
        args = copy.copy(args)
        args.region = region
        # Each replica is one writer, so it is one host directory of the store (the store's rule): the node
        # and the replica's slot there, which also lets diagnose tell one replica's spike from its neighbours'.
        # Given at construction: a store segment's meta is written when the segment opens.
        args.record_extra = {"host": replica_host(self.host, self.slot), "node": self.host, "slot": self.slot,
                             "replica": self.replica_id, "pid": os.getpid(),
                             "node_id": ray.get_runtime_context().get_node_id()}
        self.parts = _Parts()
        try:
            self.parts.build(args)
            self._sd_file = None
            self.metrics_target = self._expose_metrics(args)
        except Exception:
            self.parts.close()
            raise
        self.state = None

    def _expose_metrics(self, args) -> str:
        """Serve this replica's registry on an ephemeral port of the node; list it for Prometheus."""
        from prometheus_client import start_http_server

        addr = args.metrics_host or ("127.0.0.1" if _is_loopback(args.host) else ray.util.get_node_ip_address())
        server, _ = start_http_server(0, addr=addr, registry=self.parts.exporter.registry)
        self._metrics_server = server
        target = f"{addr}:{server.server_port}"
        if args.metrics_sd_dir:
            os.makedirs(args.metrics_sd_dir, exist_ok=True)
            self._sd_file = os.path.join(args.metrics_sd_dir, f"aurora-{self.replica_id}.json")
            labels = {"replica": self.replica_id, "region": self.region, "host": self.host}
            tmp = self._sd_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump([{"targets": [target], "labels": labels}], f)
            os.replace(tmp, self._sd_file)  # Prometheus never reads half a file
        return target

    def __serve_build_asgi_app__(self):
        app = create_app(self.parts.pipeline, self.config, registry=self.parts.exporter.registry)
        self.state = app.state.server
        return app

    def reconfigure(self, user_config, rank=None):
        """Ray renumbers ranks to keep them contiguous (after a downscale, a survivor may take the leaver's):
        the recorder follows, so that the replica that later takes this slot is not a second writer in it."""
        slot = _slot(rank)
        if rank is None or slot == self.slot:
            return
        self.slot = slot
        if self.parts.recorder is not None:
            self.parts.recorder.set_meta("host", replica_host(self.host, slot))  # the writer moves (StoreWriter)
            self.parts.recorder.set_meta("slot", slot)

    def check_health(self):
        # A device fault turns the pipeline not-ready; failing here makes Ray replace the replica.
        if not self.parts.pipeline.ready:
            raise RuntimeError(f"aurora replica {self.replica_id}: pipeline not ready (device fault)")

    def __del__(self):
        # Ray has already stopped routing here and waited for the ongoing requests.
        if getattr(self, "state", None) is not None:
            self.state.draining = True
        if getattr(self, "_sd_file", None):
            try:
                os.remove(self._sd_file)
            except OSError:
                pass
        if getattr(self, "_metrics_server", None) is not None:
            self._metrics_server.shutdown()
        if getattr(self, "parts", None) is not None:
            self.parts.close()


class _TypedProxyErrors:
    """ASGI middleware in Ray's HTTP proxy. When a replica dies with a request in flight (``ray.kill``, a
    crash, an OOM kill), Ray's proxy ends the request without a response and its uvicorn answers a
    plain-text 500; this sends the server's JSON ``internal_error`` body instead, so a client always
    gets one error schema."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_wrapper(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not started:
                rid = _request_id(scope)
                log.warning("aurora serve --ray: request %s got no response from its replica", rid)
                await error_response(500, "internal_error", "the replica serving this request stopped before "
                                     "answering (Ray replaces it); retry", rid)(scope, receive, send)


def proxy_middlewares() -> list:
    """The callback named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (``PROXY_ENV``)."""
    from starlette.middleware import Middleware

    return [Middleware(_TypedProxyErrors)]


#: Environment of the Ray processes (set before ``ray start`` / ``ray.init``) that puts
#: ``_TypedProxyErrors`` into Serve's HTTP proxies.
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": f"{__name__}.proxy_middlewares"}


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def deployment_options(args: argparse.Namespace) -> dict:
    """Ray Serve options for ``aurora serve``'s arguments: fixed ``--replicas`` or ``--autoscale``."""
    opts = {
        "name": "AuroraReplica",
        "max_ongoing_requests": args.max_concurrent_requests,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": args.shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,
        "ray_actor_options": {"num_cpus": args.replica_cpus, "num_gpus": args.replica_gpus},
    }
    if args.autoscale:
        lo, hi = args.autoscale
        opts["autoscaling_config"] = autoscaling_preset(lo, hi, args.max_batch_size)
    else:
        opts["num_replicas"] = args.replicas
    return opts


def build(args: argparse.Namespace):
    """The bound Serve application for ``serve.run``."""
    args = copy.copy(args)
    # A replica runs in a Ray worker whose working directory is not the driver's (and is on another node):
    # relative output paths mean the driver's directory.
    for name in ("record", "metrics_sd_dir"):
        if getattr(args, name, None):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    return AuroraReplica.options(**deployment_options(args)).bind(args, region=args.region or "local")


def connect(address: str | None = None, num_cpus: int | None = None, host: str = "127.0.0.1") -> None:
    """Join the Ray cluster at ``address`` (or RAY_ADDRESS, or a running local one); start a local Ray
    when there is none (on loopback only when ``host``, the HTTP address, is loopback)."""
    if ray.is_initialized():
        return
    for k, v in PROXY_ENV.items():  # inherited by the local Ray this may start
        os.environ.setdefault(k, v)
    kwargs = {"include_dashboard": False, "log_to_driver": False}
    try:
        ray.init(address=address or "auto", **kwargs)
        log.info("aurora serve --ray: joined the Ray cluster at %s", address or "auto")
    except ConnectionError:
        if address:
            raise
        if _is_loopback(host):
            kwargs["_node_ip_address"] = "127.0.0.1"  # a one-machine Ray needs no port on the network
        ray.init(num_cpus=num_cpus, **kwargs)
        log.info("aurora serve --ray: no Ray cluster was running; started a local one")


def start(args: argparse.Namespace, *, blocking: bool = False):
    """Start Serve's proxy on ``--host:--port`` and deploy; returns the app's handle."""
    serve.start(http_options={"host": args.host, "port": args.port})
    return serve.run(build(args), name=APP_NAME, route_prefix="/", blocking=blocking)


class _DeployTimeout(Exception):
    pass


def _deploy_state() -> str:
    """What Serve says of the deployment (e.g. resources no node has), for the operator's one line."""
    try:
        d = serve.status().applications[APP_NAME].deployments["AuroraReplica"]
        return f"; Ray Serve says: {d.status}, replicas {dict(d.replica_states)}" + (f", {d.message}" if d.message else "")
    except Exception:
        return ""


def _delete(timeout_s: float) -> bool:
    """serve.delete the app, waiting at most timeout_s: a Ctrl-C in a terminal also reaches the local Ray's
    own processes (one process group), and a dead raylet would leave serve.delete waiting for ever."""
    if not ray.is_initialized():
        return True
    deleting = threading.Thread(target=serve.delete, args=(APP_NAME,), daemon=True)
    deleting.start()
    deleting.join(timeout_s)
    return not deleting.is_alive()


def run(args: argparse.Namespace) -> int:
    """``aurora serve --ray``: deploy, then hold the deployment until Ctrl-C / SIGTERM."""
    import signal

    stops = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in (*stops, signal.SIGALRM)}
    stop = []

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def timed_out(*_):
        raise _DeployTimeout

    def on_stop(handler):
        for sig in stops:
            signal.signal(sig, handler)

    # serve.run waits without limit for the replicas (resources no node has, a replica that hangs in
    # __init__): while deploying, Ctrl-C / SIGTERM and --deploy-timeout-s interrupt that wait.
    on_stop(interrupt)
    signal.signal(signal.SIGALRM, timed_out)
    signal.setitimer(signal.ITIMER_REAL, args.deploy_timeout_s)
    try:
        try:
            connect(args.ray_address, host=args.host)
            on_stop(interrupt)  # ray.init sets its own SIGTERM handler (sys.exit, no drain)
            start(args)
            signal.setitimer(signal.ITIMER_REAL, 0)
            on_stop(lambda *_: stop.append(True))
        except (KeyboardInterrupt, _DeployTimeout) as e:
            signal.setitimer(signal.ITIMER_REAL, 0)
            on_stop(lambda *_: stop.append(True))
            why = (f"the replicas were not all running after --deploy-timeout-s {args.deploy_timeout_s:g} s"
                   f"{_deploy_state()}; check --replica-cpus/--replica-gpus against the cluster's resources "
                   "and the replicas' logs" if isinstance(e, _DeployTimeout) else f"{e or 'SIGINT'} while deploying")
            removed = _delete(args.shutdown_timeout_s + 10)
            print(f"aurora serve --ray: cannot start: {why}; "
                  + ("the deployment was removed" if removed else "Ray did not confirm removing the deployment"),
                  file=sys.stderr)
            return EXIT_STARTUP
        except Exception as e:
            signal.setitimer(signal.ITIMER_REAL, 0)
            print(f"aurora serve --ray: cannot start: {e}", file=sys.stderr)
            return EXIT_STARTUP
        log.info("aurora serve --ray: listening on http://%s:%d (%s)", args.host, args.port,
                 f"autoscale {args.autoscale[0]}:{args.autoscale[1]}" if args.autoscale
                 else f"{args.replicas} replicas")
        while not stop:
            time.sleep(0.2)
        # Graceful: every replica drains.
        if not _delete(args.shutdown_timeout_s + 10):
            log.error("aurora serve --ray: Ray did not confirm the drain within %g s", args.shutdown_timeout_s + 10)
            return 1
        return EXIT_OK
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
