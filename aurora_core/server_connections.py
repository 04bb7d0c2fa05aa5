"""The connection policy of ``aurora serve``: many cheap idle connections, few costly requests.

Two limits, kept apart. Requests in flight are bounded by ``ServerConfig.max_concurrent_requests``
(the app answers 503 past it). Open connections, idle keep-alive ones included, are bounded only by
``max_connections``, by default the process's file-descriptor limit less a reserve: an idle socket
costs asyncio a few KiB and no thread, so thousands of them must not crowd out a single request.

Under a flood of connections that send nothing (or trickle their headers):

- at the cap, a new connection sheds the connection that has been idle longest (no request in
  flight: before its first request, between keep-alive requests, or still sending headers), as nginx
  and Envoy do, instead of being refused. Only when every connection has a request in flight is the
  new one refused (its request gets the JSON 503 ``too_many_connections``);
- a connection must complete a request's headers within ``header_timeout_s`` of connecting or of its
  previous response (slowloris). Under pressure, when more than half the cap is open, that deadline
  shortens to ``pressure_header_timeout_s`` (1 s).

Every connection closed by this policy is counted in ``aurora_http_connections_shed_total{reason}``
and summed up in a log line at most every ``_LOG_PERIOD_S``. The FastAPI app knows nothing of this:
the policy lives in the uvicorn protocol, so the app can be mounted under any ASGI server.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict

log = logging.getLogger("aurora_core.server")

#: Why a connection was closed by the policy (the ``reason`` label of the shed counter).
SHED_REASONS = ("at_cap", "pressure", "header_timeout", "refused")
_SWEEP_PERIOD_S = 0.05
# Closes per sweep. A close costs the loop ~10 µs in the sweep (measured here, 1,000 closes) plus its
# connection_lost callback; the bound keeps a deadline that passes for tens of thousands of connections at
# once from stalling the loop for most of a second. 5,120 deadline closes a second at most; past that, the
# cap sheds the rest as new connections arrive.
_MAX_CLOSES_PER_SWEEP = 256
_LOG_PERIOD_S = 5.0


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= soft:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:  # e.g. a sandbox that forbids it: keep serving under the old limit
        log.warning("cannot raise the file-descriptor limit from %d to %d: %s", soft, hard, e)
        return soft, soft
    return soft, hard


def default_max_connections() -> int:
    """The soft file-descriptor limit less a reserve for everything else the process opens (model
    files, the run file, /proc reads, pipes): a tenth of the limit, at least 256."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, soft - max(256, soft // 10))


class ConnectionPolicy:
    """Tracks open connections and closes idle ones at the cap and past their header deadline.

    Runs on the event loop; the protocol calls ``opened``, ``update`` and ``lost``. ``idle`` maps each
    connection without a request in flight to the loop time it became idle, oldest first: the head
    is both the one to shed and the first to pass its header deadline.
    """

    def __init__(self, max_connections: int, header_timeout_s: float, pressure_header_timeout_s: float = 1.0,
                 registry=None):
        if max_connections < 1:
            raise ValueError(f"ConnectionPolicy: expected max_connections >= 1, got {max_connections}")
        if not (header_timeout_s > 0 and pressure_header_timeout_s > 0):
            raise ValueError("ConnectionPolicy: expected header timeouts > 0, got "
                             f"{header_timeout_s} and {pressure_header_timeout_s}")
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.pressure_header_timeout_s = min(pressure_header_timeout_s, header_timeout_s)
        self.open: set = set()
        self.idle: OrderedDict = OrderedDict()
        self.shed = dict.fromkeys(SHED_REASONS, 0)
        self._logged = dict(self.shed)
        self._last_log = self._last_pressure_log = float("-inf")
        self._was_pressed = False
        self._counter = None
        if registry is not None:
            self._register(registry)

    def _register(self, registry):
        from prometheus_client import Counter, Gauge

        Gauge("aurora_http_connections", "open HTTP connections, idle ones included",
              registry=registry).set_function(lambda: len(self.open))
        Gauge("aurora_http_connections_limit", "connection cap past which the longest-idle one is shed",
              registry=registry).set(self.max_connections)
        self._counter = Counter("aurora_http_connections_shed", "connections closed by the connection policy: "
                                "at_cap (longest idle, to admit a new one), pressure (no headers within the "
                                "shortened deadline), header_timeout (no headers within --header-timeout-s), "
                                "refused (at the cap with every connection busy)", ["reason"], registry=registry)
        for reason in SHED_REASONS:
            self._counter.labels(reason)

    @property
    def under_pressure(self) -> bool:
        return 2 * len(self.open) > self.max_connections

    # -- called by the protocol -------------------------------------------------------------------
    def opened(self, conn, now: float) -> bool:
        """A new connection; False when it must be refused (at the cap with nothing idle to shed)."""
        admitted = True
        if len(self.open) >= self.max_connections:
            if self.idle:
                self._close(next(iter(self.idle)), "at_cap")
            else:
                self._count("refused")
                admitted = False
        self.open.add(conn)
        self.idle[conn] = now
        return admitted

    def update(self, conn, busy: bool, now: float) -> None:
        """After the connection's state may have changed: busy = a request is in flight on it."""
        if busy:
            self.idle.pop(conn, None)
        elif conn not in self.idle and conn in self.open:
            self.idle[conn] = now  # idle again: goes to the back of the line, its deadline restarts

    def lost(self, conn) -> None:
        self.open.discard(conn)
        self.idle.pop(conn, None)

    # -- periodic -----------------------------------------------------------------------------------
    def sweep(self, now: float) -> None:
        """Close the connections past their header deadline: the shorter one while over half the
        cap is open (so pressure sheds down to half the cap, oldest first), else the quiet-time one."""
        pressed = self.under_pressure
        for _ in range(_MAX_CLOSES_PER_SWEEP):
            if not self.idle:
                break
            conn, since = next(iter(self.idle.items()))
            if now - since >= self.header_timeout_s:
                self._close(conn, "header_timeout")
            elif self.under_pressure and now - since >= self.pressure_header_timeout_s:
                self._close(conn, "pressure")
            else:
                break
        self._report(now, pressed)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_SWEEP_PERIOD_S)
            try:
                self.sweep(loop.time())
            except Exception:  # a sweep that stopped would leave slowloris unchecked: report and go on
                log.exception("connection sweep failed")

    # -- internals ----------------------------------------------------------------------------------
    def _close(self, conn, reason: str) -> None:
        self.lost(conn)
        self._count(reason)
        conn.shed()

    def _count(self, reason: str) -> None:
        self.shed[reason] += 1
        if self._counter is not None:
            self._counter.labels(reason).inc()

    def _report(self, now: float, pressed: bool) -> None:
        """One log line per _LOG_PERIOD_S at most, whatever the flood's rate (a line per shed
        connection would cost the loop more than the connection did)."""
        if pressed and not self._was_pressed and now - self._last_pressure_log >= _LOG_PERIOD_S:
            self._last_pressure_log = now
            log.warning("connection pressure: %d open of a cap of %d; connections must send their headers "
                        "within %g s, and the longest-idle ones are shed at the cap", len(self.open),
                        self.max_connections, self.pressure_header_timeout_s)
        self._was_pressed = pressed
        if self.shed == self._logged or now - self._last_log < _LOG_PERIOD_S:
            return
        delta = {r: self.shed[r] - self._logged[r] for r in SHED_REASONS if self.shed[r] != self._logged[r]}
        self._logged, self._last_log = dict(self.shed), now
        log.warning("closed %d connections without a request in flight (%s); %d open of a cap of %d",
                    sum(delta.values()), ", ".join(f"{r}: {n}" for r, n in delta.items()), len(self.open),
                    self.max_connections)


def http_protocol(policy: ConnectionPolicy, refuse_app):
    """uvicorn's h11 protocol, reporting its connection's state to ``policy``.

    refuse_app: the ASGI app that answers the requests of a connection ``policy`` refused.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            if not policy.opened(self, self.loop.time()):
                self.app = refuse_app

        def data_received(self, data):
            super().data_received(data)
            self._report()

        def on_response_complete(self):
            super().on_response_complete()
            self._report()  # after a pipelined request the next one may already be running

        def connection_lost(self, exc):
            policy.lost(self)
            super().connection_lost(exc)

        def _report(self):
            if self.transport.is_closing():
                policy.lost(self)  # its descriptor is on its way out: neither a slot nor sheddable
            else:
                busy = self.cycle is not None and not self.cycle.response_complete
                policy.update(self, busy, self.loop.time())

        def shed(self):
            """Close a connection that has no request in flight (nothing to flush, nothing to answer)."""
            if not self.transport.is_closing():
                self.transport.close()

    return _Protocol
