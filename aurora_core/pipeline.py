"""``Pipeline``: the serving object. Wires decode, preprocess, the batcher and the runner.

Threads (all daemon, all joined by ``close``):
  callers        submit(): stamp arrival, start decoding encoded bytes on the worker pool (for the
                 first few batches' worth of queue), admit to the Batcher or fail at once (Overloaded,
                 PipelineClosed, DeviceLost).
  aurora-decode  the worker pool: decodes, so a decode overlaps the request's wait in the queue. With
                 gpu_decode, a batch worker decodes its batch's JPEGs on the device instead, in one call.
  aurora-batch-0, aurora-batch-1
                 two identical batch workers, each with its own batch slab. A worker waits for the batcher
                 to close a batch, waits for its decodes, preprocesses it straight into rows 0..n-1 of its
                 slab (one C++ call, or the Triton kernel on the device), starts the H2D copy, runs the
                 model when the previous batch is done with it, and completes the futures (their callbacks
                 run on it too). So while one computes batch N the other prepares batch N+1 (the records'
                 preprocess spans show it), and a batch never changes threads between its stages: on a
                 light load, one wake-up for the first request and one at the batch deadline.
Deadlines apply while a request waits for its batch: once its batch has closed it is computed.

After a sticky device error with cpu_fallback, a batch already preprocessed on the lost device (its rows
live in that device's memory) is preprocessed again on the CPU from its decoded images, which are kept
until such a batch completes; a batch whose device staging hits the error is served on the CPU the same
way. Only the batch that was running on the device when the error struck gets DeviceLost.

Every admitted request ends in exactly one result or one typed error, and one RequestRecord reaches
the sinks for every request, including rejected and failed ones.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
import numbers
import operator
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from aurora_core.batching import Batcher, BatchingConfig, Request
from aurora_core.errors import AuroraError, DeviceLost, ImageError, PipelineClosed, ResourceExhausted
from aurora_core.records import RequestRecord, current_request, now_ns
from aurora_core.runner import Runner, default_compile, load_model, resolve_dtype

log = logging.getLogger(__name__)

@dataclass(slots=True)
class Prediction:
    """top_k: [(class_index, probability)], most probable first. timings: this request's record."""

    top_k: list
    timings: RequestRecord


def _status(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or "internal_error"


class Pipeline:
    """Dynamic-batching image classifier.

    model: torchvision architecture name (random init with ``seed`` unless ``weights`` names a local
        state_dict), an nn.Module, or a TorchScript / torch.export file. None: resnet50 on CUDA,
        mobilenet_v3_small on the CPU.
    spec: PreprocessSpec (default: ImageNet 256/224). batching: BatchingConfig.
    device: "auto" (CUDA when present), "cpu", "cuda", "cuda:1". dtype: fp32 (default), fp16, bf16.
    top_k: classes per Prediction. sink: a callable taking RequestRecord, or a list of them.
    cpu_fallback: after a sticky device error, continue on the CPU instead of shutting down.
    num_workers: threads that decode (from admission on, while the request waits) and preprocess (one
        batched kernel call per batch) (default: CPU count, at most 8; 1 decodes on the batching thread).
        With the model on the CPU, the decoding threads run at a lower OS priority (Linux nice +10): they
        fill the cycles the model leaves, instead of taking turns with it on its core.
    fast_decode: decode JPEGs at the smallest DCT scale that keeps fast_gap x the resize (fast_min_size);
        False decodes at full size (exact mode). Either way only the rows and columns the crop reads are
        decoded (decode_ex's crop_for). fast_gap: 4 (default), 2 or 1 trade fidelity for speed (Pillow's
        reducing_gap meaning; errors per setting in benchmarks/RESULTS.md, issue 20).
    decode_limits: max_pixels / max_bytes passed to decode. cuda_graphs / channels_last: runner options.
    device_preprocess: "auto" (default): on CUDA, preprocess with the Triton kernel on the device when it
        loads and warms up, else on the CPU; "on": the Triton kernel, raising when it cannot be used (and
        on a CPU device); "off": on the CPU into pinned memory, then an async copy. True / False / None
        mean "on" / "off" / "auto". The kernel is compiled and autotuned during start-up.
    gpu_decode: "off" (default), "on" or "auto": decode JPEGs on the device with nvJPEG
        (``aurora_core.gpu_decode.GpuDecoder``) in one batched call per batch, instead of on the CPU pool from
        admission. Needs CUDA and device preprocessing, which then reads the decoded planes in place; other
        formats and images nvJPEG rejects are decoded on the CPU by the same call, with the same limits and
        errors. "auto" uses it when nvJPEG works here. A GpuDecoder instance is used as given.
    compile: on the CPU, run the model compiled ahead of time (torch.export + AOTInductor, cached on disk by
        model, weights, dtype, torch version and CPU; ``aurora_core/aot.py``): True blocks start-up until it is
        loaded or built, "background" serves eager until it is ready, False never. None: $AURORA_COMPILE
        (off, on, background) when set, else "background". A model torch.export cannot capture (e.g.
        control flow on tensor values) stays eager, with a warning. jit_freeze: its former name.
    """

    def __init__(self, model=None, spec=None, batching: BatchingConfig | None = None, device="auto", dtype=None, *,
                 weights=None, top_k: int = 5, sink=None, cpu_fallback: bool = False, num_workers: int | None = None,
                 fast_decode: bool = True, fast_gap: float = 4, decode_limits: dict | None = None, cuda_graphs: bool = True,
                 channels_last: bool | None = None, device_preprocess: str | bool | None = "auto", seed: int = 0,
                 compile: bool | str | None = None, jit_freeze: bool | None = None, gpu_decode="off"):
        from aurora_core.ops.preprocess import PreprocessSpec, fast_min_size

        if spec is not None and not isinstance(spec, PreprocessSpec):
            raise TypeError(f"Pipeline: spec must be a PreprocessSpec, got {type(spec).__name__}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"Pipeline: top_k must be an int >= 1, got {top_k!r}")
        self.config = batching if batching is not None else BatchingConfig()
        if not isinstance(self.config, BatchingConfig):
            raise TypeError(f"Pipeline: batching must be a BatchingConfig, got {type(self.config).__name__}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("Pipeline: device='cuda' but torch.cuda.is_available() is False; use device='cpu'")
        if spec is None:
            # On CUDA, preprocess straight into the model's dtype: half the bytes over PCIe for fp16/bf16.
            spec = PreprocessSpec(dtype=resolve_dtype(dtype)) if device.type == "cuda" else PreprocessSpec()
        self.spec = spec
        if model is None:
            model = "resnet50" if device.type == "cuda" else "mobilenet_v3_small"
        self.model_name = model if isinstance(model, str) else type(model).__name__
        self._sinks = list(sink) if isinstance(sink, list | tuple) else ([sink] if sink is not None else [])
        for s in self._sinks:
            if not callable(s):
                raise TypeError(f"Pipeline: sink must be a callable taking a RequestRecord (or a list of them), "
                                f"got {type(s).__name__}")
        nw = min(8, os.cpu_count() or 1) if num_workers is None else _int_arg("Pipeline: num_workers", num_workers)
        if nw < 1:
            raise ValueError(f"Pipeline: num_workers must be >= 1, got {nw}")
        self._fast = fast_decode
        fast_min_size((1, 1), self.spec, fast_gap)  # a bad gap fails here, before the model loads
        self._fast_gap = fast_gap
        self._limits = _decode_limits(decode_limits)
        self._cpu_fallback = cpu_fallback
        if compile is None:
            compile = default_compile() if jit_freeze is None else bool(jit_freeze)
        self._runner_kw = dict(dtype=dtype, buckets=self.config.bucket_sizes,
                               input_shape=(3, self.spec.crop, self.spec.crop), input_dtype=self.spec.dtype,
                               top_k=top_k, channels_last=channels_last, cuda_graphs=cuda_graphs,
                               compile=compile)
        mode = _preprocess_mode(device_preprocess)
        if isinstance(gpu_decode, str | bool) or gpu_decode is None:
            _preprocess_mode(gpu_decode, "gpu_decode")  # a bad value fails before the model loads
        use_triton = False
        if device.type == "cuda" and mode != "off":
            use_triton = _triton_available()
            if mode == "on" and not use_triton:
                raise RuntimeError("Pipeline: device_preprocess='on' but the Triton preprocessing backend cannot be "
                                   "used (triton missing or broken, or AURORA_BACKEND names another backend)")
        elif mode == "on":
            raise ValueError(f"Pipeline: device_preprocess='on' needs a CUDA device, got {device}")
        net = load_model(model, weights=weights, seed=seed)
        # The runner moves and casts the module in place; keep a CPU copy to rebuild from after a device loss.
        self._fallback_net = copy.deepcopy(net).cpu() if cpu_fallback else None
        self._runner = Runner(net, device=device, preprocess_spec=self.spec if use_triton else None,
                              **self._runner_kw)
        if use_triton and self._runner.preprocess_error is not None:
            if mode == "on":
                raise RuntimeError(f"Pipeline: device_preprocess='on' but the Triton preprocessing kernel failed "
                                   f"to warm up: {self._runner.preprocess_error!r}") from self._runner.preprocess_error
            log.warning("Pipeline: preprocessing on the CPU (the Triton kernel failed to warm up)")
            use_triton = False
        self._device_preprocess = use_triton
        self._gpu_decoder = _gpu_decoder(gpu_decode, device, use_triton, self._limits)

        self._ids = itertools.count()
        self._stats_lock = threading.Lock()
        self._counts: Counter = Counter()
        self._sink_failed = False
        self._failure: BaseException | None = None
        self._retired: Counter = Counter()  # counters of runners replaced after a device loss
        self._state_lock = threading.Lock()
        self.batcher = Batcher(self.config, on_drop=self._on_drop)

        # With more than one worker, encoded requests are decoded by the pool as they arrive.
        # On the CPU the model's thread is the bottleneck stage, and the decoders shared its core with it as
        # equals: mobilenet_v3_small, default mix, 2-core box, offline 166 -> 191 images/s (medians of 5,
        # one run; commit 2fd4b85).
        self._pool = ThreadPoolExecutor(
            nw, thread_name_prefix="aurora-decode",
            initializer=_lower_priority if self._runner.device.type == "cpu" else None) if nw > 1 else None
        self._nw = nw
        self._eager_depth = 4 * self.config.max_batch_size
        # Both workers wait on the batcher itself, and the model runs batches in the order they closed
        # (batch_id). Before, a former thread handed each batch to a compute thread through a queue: a
        # hop (and a GIL hand-off) more per batch: context switches per request at Poisson 4,000/s went
        # 1.54 -> 0.82 (commit b2272b7), though no throughput or p99 gain showed (benchmarks/RESULTS.md).
        self._turn = 0  # batch_id whose turn it is to run the model
        self._turn_cond = threading.Condition(threading.Lock())
        self._ready = True
        self._generation = _fork_generation  # the threads below do not survive a fork
        self._workers = [threading.Thread(target=self._work_loop, args=(self._runner.new_slab(i),),
                                          name=f"aurora-batch-{i}", daemon=True) for i in range(2)]
        for t in self._workers:
            t.start()

    # ---- public API ----------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return self._runner.device_str

    @property
    def runner(self) -> Runner:
        """The current runner (replaced by a CPU one after a device loss with cpu_fallback)."""
        return self._runner

    @property
    def device_preprocess(self) -> bool:
        """True while batches are preprocessed on the device (Triton kernel)."""
        return self._device_preprocess

    @property
    def gpu_decode(self) -> bool:
        """True while JPEGs are decoded on the device (nvJPEG), one batched call per batch."""
        return self._gpu_decoder is not None

    @property
    def ready(self) -> bool:
        """Warmed up, device healthy, admitting requests (never in a process forked from the creator)."""
        return self._ready and not self.batcher.closed and _fork_generation == self._generation

    def queue_depth(self) -> int:
        return len(self.batcher)

    def stats(self) -> dict:
        """Counters. submitted == completed + cancelled + sum(errors.values()); errors (by reason) include
        the rejected ones (refused at admission: overloaded, pipeline_closed, device_lost). Also batches,
        batches_prepared, decoded (encoded inputs decoded, failed or not), graph_replays, eager_runs,
        oom_splits, queue_depth, device and ready. Raises PipelineClosed in a forked child (a parent's thread
        may have held the counters' lock at the fork)."""
        if _fork_generation != self._generation:
            raise _forked()
        with self._stats_lock:
            c = dict(self._counts)
        errors = {k[4:]: v for k, v in c.items() if k.startswith("err:")}
        rc = self._runner.counters
        return {
            "submitted": self.batcher.admitted + c.get("rejected", 0),
            "admitted": self.batcher.admitted,
            "completed": c.get("ok", 0),
            "rejected": c.get("rejected", 0),
            "cancelled": c.get("cancelled", 0),
            "errors": errors,
            "batches_prepared": c.get("batches_prepared", 0),
            "decoded": c.get("decoded", 0),
            **{k: rc[k] + self._retired[k] for k in ("batches", "graph_replays", "eager_runs", "oom_splits")},
            "queue_depth": len(self.batcher),
            "device": self.device,
            "ready": self.ready,
        }

    def request(self) -> RequestContext:
        """Open a request before its data is ready, so that the work serving code does for it first (a
        feature-store call) is timed as a span of this request, and ``diagnose`` counts it in the latency
        the user saw and can name it as a slow dependency::

            with pipe.request() as ctx:
                with rec.span("feature_store"):   # or ctx.span(...): linked to ctx.request_id
                    features = fetch(...)
                pred = ctx.infer(data)

        The request id is reserved now; the request arrives when ``ctx.submit``/``infer`` is called."""
        return RequestContext(self, next(self._ids))

    def submit(self, data, timeout: float | None = None, priority: int = 0) -> Future:
        """Queue one request. data: encoded bytes, or a decoded uint8 [H, W, 3] array.
        timeout (s): the request is dropped with DeadlineExceeded if its batch has not closed by then; it
            bounds the wait in the queue only (a batch that has closed is computed). None or inf: no deadline.
        priority: 0 (default, lowest) .. priority_levels - 1. Returns a Future of Prediction.
        Raises PipelineClosed in a process forked after the Pipeline was created."""
        return self._submit(data, timeout, priority, -1)

    def _submit(self, data, timeout: float | None, priority: int, request_id: int) -> Future:
        """submit(); request_id >= 0: the id ``request()`` reserved, else a new one."""
        arrival = now_ns()
        if _fork_generation != self._generation:
            # Raised, not set on a future: the parent's threads may have held any lock at the fork.
            raise _forked()
        if type(priority) is not int:
            priority = _int_arg("Pipeline.submit: priority", priority)
        if not 0 <= priority < self.config.priority_levels:
            raise ValueError(f"Pipeline.submit: priority must be an int in [0, {self.config.priority_levels}), got {priority!r}")
        if not isinstance(data, (np.ndarray, bytes)):  # the two common cases first: this runs per request
            if isinstance(data, (bytearray, memoryview)):
                data = bytes(data)
            elif isinstance(data, torch.Tensor):
                data = data.numpy()
            else:
                raise TypeError(f"Pipeline.submit: expected bytes or a uint8 [H, W, 3] array, got {type(data).__name__}")
        if isinstance(data, np.ndarray):
            if data.dtype != np.uint8 or data.ndim != 3 or data.shape[2] != 3 or data.shape[0] < 1 or data.shape[1] < 1:
                raise ValueError(f"Pipeline.submit: expected a uint8 array [H, W, 3], got {data.dtype} {list(data.shape)}. "
                                 "Pass encoded bytes or decode with aurora_core.decode() first.")
        if timeout is not None:
            timeout = _timeout_s(timeout)
        rec = RequestRecord(request_id=request_id if request_id >= 0 else next(self._ids), arrival_ns=arrival,
                            priority=priority,
                            device=self._runner.device_str)
        fut: Future = Future()
        req = Request(data, priority, arrival + int(timeout * 1e9) if timeout is not None else 0, fut, rec)
        try:
            if self._failure is not None:
                raise DeviceLost(f"Pipeline: down after a sticky device error ({self._failure}); create a new Pipeline")
            if (self._pool is not None and not isinstance(data, np.ndarray) and not self.batcher.closed
                    and len(self.batcher) < self._eager_depth and not _for_nvjpeg(req, self._gpu_decoder)):
                # Decode while the request waits for its batch: the decode leaves the batch's critical path.
                # Started before admission so that the batch worker always finds it. Only the first few
                # batches' worth are decoded ahead, so a deep queue does not hold decoded pixels. With
                # gpu_decode, only what nvJPEG will not take (PNG, CMYK, ...) is decoded here.
                try:
                    req.decoding = self._pool.submit(self._decode_safe, req)
                except RuntimeError as e:  # close() shut the pool since the check above
                    raise PipelineClosed("Pipeline: closed; no new requests are admitted") from e
            self.batcher.put(req)
        except AuroraError as e:
            self._count("rejected")
            self._finish(req, exc=e)
            return fut
        return fut

    def infer(self, data, timeout: float | None = None, priority: int = 0) -> Prediction:
        """Blocking submit(...).result(); raises the request's typed error."""
        return self.submit(data, timeout, priority).result()

    async def infer_async(self, data, timeout: float | None = None, priority: int = 0) -> Prediction:
        """Await one prediction; cancelling the awaiting task cancels the request if it still waits."""
        return await asyncio.wrap_future(self.submit(data, timeout, priority))

    def close(self, timeout: float | None = None) -> None:
        """Stop admitting, finish every admitted request, stop the threads. Idempotent.

        timeout (s): None waits until every admitted request has been served. Otherwise close returns
        after about ``timeout`` at most: the requests still queued then end with PipelineClosed (never
        computed), the batches the workers already hold finish in the background (a result or a typed
        error each), and the workers and the decode pool stop after them. Either way every admitted
        request ends with exactly one result or one typed error. In a process forked after the Pipeline was
        created, close does nothing: the pipeline's threads live in the parent. Called on a batch worker (from
        a future's callback), close does not wait: the queued requests are still served, and the threads stop
        after them."""
        if _fork_generation != self._generation:
            return
        self.batcher.close()
        if threading.current_thread() in self._workers:  # a worker cannot wait for itself
            if self._pool is not None:
                threading.Thread(target=self._stop_pool_after_workers, name="aurora-close", daemon=True).start()
            return
        end = None if timeout is None else time.monotonic() + max(0.0, timeout)
        for t in self._workers:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        if any(t.is_alive() for t in self._workers):
            self._fail_queued(lambda: PipelineClosed("Pipeline: closed (close timeout) before this request was "
                                                     "batched"))
            if self._pool is not None:
                # A worker still running decodes on the pool: shut it only after the workers.
                threading.Thread(target=self._stop_pool_after_workers, name="aurora-close", daemon=True).start()
        elif self._pool is not None:
            # With a timeout, a running decode of a request already dropped must not hold close past it.
            self._pool.shutdown(wait=timeout is None)

    def _stop_pool_after_workers(self) -> None:
        for t in self._workers:
            t.join()
        self._pool.shutdown(wait=True)

    def _fail_queued(self, make_exc) -> None:
        """End every request still waiting in the queue with ``make_exc()`` (or as cancelled)."""
        for r in self.batcher.drain_all():
            if r.future.set_running_or_notify_cancel():
                self._finish(r, exc=make_exc())
            else:
                self._finish(r, status="cancelled")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- completion -----------------------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._counts[key] += n

    def _finish(self, req: Request, result=None, exc: BaseException | None = None, status: str | None = None,
                counted: bool = False) -> None:
        rec = req.record
        d = req.decoding
        if d is not None and not d.done() and not d.cancel():
            # A request dropped while its admission-time decode runs: the decode would stamp the record
            # after the sinks saw it, so they get a copy of it. (A decode not started yet is cancelled.)
            rec = copy.copy(rec)
        rec.completion_ns = now_ns()
        rec.status = status or ("ok" if exc is None else _status(exc))
        if not counted:
            self._count(rec.status if rec.status in ("ok", "cancelled") else "err:" + rec.status)
        if self._sinks:
            self._emit(rec)
        if status == "cancelled":
            return
        if exc is not None:
            req.future.set_exception(exc)
        else:
            req.future.set_result(Prediction(result, rec))

    def _emit(self, rec: RequestRecord) -> None:
        for s in self._sinks:
            try:
                s(rec)
            except Exception:  # a broken sink must not take requests down with it
                if not self._sink_failed:
                    self._sink_failed = True
                    log.exception("Pipeline: a record sink raised; further sink errors are not logged")

    def _on_drop(self, req: Request, why: str) -> None:
        from aurora_core.errors import DeadlineExceeded

        if why == "cancelled":
            self._finish(req, status="cancelled")
        else:
            self._finish(req, exc=DeadlineExceeded("Pipeline: the deadline passed while the request was queued"))

    # ---- batch workers (aurora-batch-*) ---------------------------------------------------------
    def _work_loop(self, slab) -> None:
        _precise_timers()
        while True:
            batch = self.batcher.next_batch()
            if batch is None:
                return
            bid = batch[0].record.batch_id  # the model takes batches in this order, whichever worker has them
            prepared_by = self._runner
            try:
                live = self._prepare(batch, slab)
            except Exception as e:  # noqa: BLE001 - a bug here must not strand the batch
                self._fail_batch([r for r in batch if not r.future.done()], e, prepared_by)
                live = []
            # Counted once its rows are written (not when it closes), so "prepared" means preprocessed.
            self._count("batches_prepared")
            with self._turn_cond:
                while self._turn != bid:
                    self._turn_cond.wait()
            try:
                live, out, runner = self._compute(live, slab) if live else (live, None, None)
            finally:
                with self._turn_cond:
                    self._turn = bid + 1
                    self._turn_cond.notify()
            if out is not None:
                try:
                    self._complete(live, out, runner)
                except Exception as e:  # noqa: BLE001 - a bug here must not strand the batch
                    self._fail_batch([r for r in live if not r.future.done()], e, runner)

    def _prepare(self, batch: list[Request], slab) -> list[Request]:
        """Decode every request (worker pool), then preprocess the decoded ones into rows 0..n-1 of
        ``slab`` in one batched kernel call; returns the requests to compute, in row order. A request
        that fails here is finished at once and takes no row, so it never disturbs its batch-mates."""
        failures: list = []
        self._decode_all(batch, failures)
        live = [r for r in batch if r.image is not None]
        # The runner before the flag: _on_device_lost clears the flag before it swaps the runner, so a
        # CPU runner is never handed a batch for device preprocessing.
        runner = self._runner
        on_device = self._device_preprocess
        slab.on_device, slab.events, slab.prepared_for = False, {}, runner
        try:
            if live and on_device:
                live = self._stage_on_device(live, slab, runner, failures)
            elif live:
                live = self._preprocess_rows(live, slab, failures)
                runner.stage(slab)
        except Exception as e:  # noqa: BLE001 - a sticky error while staging: the batch cannot run there
            live = self._staging_failed(live, slab, e, runner, failures)
        self._finish_failures(failures, len(batch))
        self._assign_rows(live, slab)
        return live

    def _assign_rows(self, live: list[Request], slab) -> None:
        for i, r in enumerate(live):
            r.slot = i
            r.record.batch_size = len(live)
            if not slab.on_device:
                # The rows are in host memory, which survives a device loss: the pixels are not needed
                # again. Device rows do not survive it; their pixels stay until the batch completes.
                r.image = None
        slab.n = len(live)

    def _finish_failures(self, failures: list, batch_size: int) -> None:
        for r, e in failures:
            if not isinstance(e, ImageError):
                log.error("Pipeline: preparing request %d failed: %r", r.record.request_id, e)
            r.record.batch_size = batch_size
            self._finish(r, exc=e)

    def _staging_failed(self, live, slab, exc: BaseException, runner: Runner, failures: list) -> list[Request]:
        """The batch never reached the model. After a sticky error, and once the pipeline has fallen
        back to the CPU, preprocess it on the CPU and serve it there; otherwise fail it."""
        from aurora_core.runner import is_sticky

        if is_sticky(exc):
            if not isinstance(exc, DeviceLost):
                exc = DeviceLost(f"Pipeline: sticky device error: {exc}")
            self._on_device_lost(exc, runner)
            new = self._runner
            if self._failure is None and new is not runner and not new.is_cuda:
                slab.on_device, slab.events, slab.prepared_for = False, {}, new
                return self._preprocess_rows(live, slab, failures)
        self._fail_batch(live, exc, runner)
        return []

    def _reprepare(self, live: list[Request], slab, runner: Runner) -> list[Request]:
        """The batch was preprocessed into the memory of a device that has since been lost: preprocess it
        again, from the decoded images it kept, for ``runner`` (the CPU fallback)."""
        failures: list = []
        n = len(live)
        slab.on_device, slab.events, slab.prepared_for = False, {}, runner
        live = self._preprocess_rows(live, slab, failures)
        runner.stage(slab)
        self._finish_failures(failures, n)
        self._assign_rows(live, slab)
        return live

    def _decode_all(self, batch: list[Request], failures: list) -> None:
        """Wait for the decodes started at admission; start the others now: on the device when the pipeline
        decodes there, else on the pool when there is one."""
        encoded = []
        runner = self._runner  # before the decoder: _on_device_lost clears the decoder, then swaps the runner
        gpu = self._gpu_decoder
        for r in batch:
            if isinstance(r.data, np.ndarray):
                r.image, r.orig_size = r.data, r.data.shape[:2]
            else:
                encoded.append(r)
                if r.decoding is None and self._pool is not None and not _for_nvjpeg(r, gpu):
                    r.decoding = self._pool.submit(self._decode_safe, r)
        if gpu is not None:
            try:
                self._decode_on_device([r for r in encoded if r.decoding is None], gpu, runner)
            except Exception as e:  # noqa: BLE001 - whatever it was, the CPU decodes this batch below
                self._gpu_decode_failed(e, runner)
                if self._pool is not None:  # in parallel, as admission-time decodes are
                    for r in encoded:
                        if r.decoding is None and r.image is None and r.error is None:
                            r.decoding = self._pool.submit(self._decode_safe, r)
        for r in encoded:
            if r.decoding is not None:
                r.decoding.result()
                r.decoding = None  # done: _finish need not look at it again (a Future lock per request)
            elif r.image is None and r.error is None:
                self._decode_safe(r)
            if r.error is not None:
                failures.append((r, r.error))

    def _decode_on_device(self, reqs: list[Request], gpu, runner: Runner) -> None:
        """One batched GpuDecoder call; a bad input fails alone. A sticky device error propagates: the
        whole batch then fails over."""
        if not reqs:
            return
        t0 = now_ns()
        # The Triton kernel reads the planes on the runner's staging stream.
        results = gpu.decode_batch([r.data for r in reqs], consumer_stream=runner.stage_stream,
                                   return_exceptions=True, routes=[r.route for r in reqs])
        t1 = now_ns()  # nvJPEG may still be running: these stamps bracket the host's part
        for r, d in zip(reqs, results, strict=True):
            r.record.decode_start_ns, r.record.decode_end_ns = t0, t1
            if isinstance(d, Exception):
                r.image, r.error = None, d
            else:
                r.image, r.orig_size, r.scale = d.image, d.orig_size, d.scale
        self._count("decoded", len(reqs))

    def _gpu_decode_failed(self, exc: BaseException, runner: Runner) -> None:
        """GPU decode failed for the whole batch, not for one image. A sticky error takes the device down:
        fall back to the CPU (then this batch is decoded there) or shut down (then the batch fails)."""
        from aurora_core.runner import is_sticky

        if not is_sticky(exc):
            log.warning("Pipeline: GPU decode failed (%r); decoding this batch on the CPU", exc)
            return
        lost = exc if isinstance(exc, DeviceLost) else DeviceLost(f"Pipeline: sticky device error in GPU decode: {exc}")
        self._on_device_lost(lost, runner)  # a no-op when another worker already handled this loss
        if self._failure is not None:
            raise lost

    def _decode_safe(self, r: Request, again: bool = False) -> None:
        """Decode on this thread; ``again``: a second decode of the same request, not counted twice."""
        try:
            self._decode(r)
        except Exception as e:  # noqa: BLE001 - every request must end, whatever broke
            r.image, r.error = None, e
        if not again:
            self._count("decoded")

    def _preprocess_rows(self, live: list[Request], slab, failures: list) -> list[Request]:
        """One preprocess_batch call writes row i of slab.host for live[i] (C++ kernel, GIL released).
        Should it raise, each image is retried alone so that only the bad one fails."""
        from aurora_core.ops.preprocess import preprocess, preprocess_batch

        live = self._host_pixels(live, failures)
        n = len(live)
        t0 = now_ns()
        try:
            preprocess_batch([r.image for r in live], self.spec, out=slab.host[:n],
                             orig_sizes=[r.orig_size for r in live], scales=[r.scale for r in live],
                             num_threads=self._nw)
            ok = live
        except Exception:  # noqa: BLE001
            ok = []
            for r in live:
                try:
                    preprocess(r.image, self.spec, out=slab.host[len(ok)], orig_size=r.orig_size, scale=r.scale)
                    ok.append(r)
                except Exception as e:  # noqa: BLE001
                    failures.append((r, e))
        t1 = now_ns()
        for r in ok:
            r.record.preprocess_start_ns, r.record.preprocess_end_ns = t0, t1
        slab.n = len(ok)
        return ok

    def _host_pixels(self, live: list[Request], failures: list) -> list[Request]:
        """Bring device-decoded images (gpu_decode) to the host for CPU preprocessing. The copy runs on the
        staging stream, which decode_batch made wait for the decoder. An image on a device that has since
        been lost is decoded again on the CPU from the request's bytes."""
        runner = self._runner
        for r in live:
            if isinstance(r.image, torch.Tensor) and r.image.is_cuda:
                if runner.is_cuda:
                    with torch.cuda.stream(runner.stage_stream):
                        r.image = r.image.cpu()
                else:
                    r.image = None
                    self._decode_safe(r, again=True)
        keep = [r for r in live if r.error is None]
        failures += [(r, r.error) for r in live if r.error is not None]
        return keep

    def _stage_on_device(self, live, slab, runner, failures) -> list[Request]:
        t0 = now_ns()
        try:
            runner.stage_images(slab, [r.image for r in live], self.spec, [r.orig_size for r in live],
                                [r.scale for r in live])
        except Exception as e:  # noqa: BLE001
            from aurora_core.runner import is_sticky

            if is_sticky(e):
                raise
            log.warning("Pipeline: device preprocessing failed (%r); preprocessing on the CPU from now on", e)
            self._device_preprocess = False
            self._gpu_decoder = None  # gpu_decode needs device preprocessing
            slab.on_device, slab.events = False, {}
            live = self._preprocess_rows(live, slab, failures)
            runner.stage(slab)
            return live
        t1 = now_ns()
        for r in live:
            r.record.preprocess_start_ns, r.record.preprocess_end_ns = t0, t1
        return live

    def _decode(self, r: Request) -> None:
        from aurora_core.decode import decode_ex, probe
        from aurora_core.ops.preprocess import fast_min_size

        rec = r.record
        rec.decode_start_ns = now_ns()
        try:
            min_size = None
            if self._fast:
                info = probe(r.data, **self._limits)
                min_size = fast_min_size((info.height, info.width), self.spec, self._fast_gap)
            d = decode_ex(r.data, min_size=min_size, crop_for=self.spec, **self._limits)
            r.image, r.orig_size, r.scale = d.image, d.orig_size, d.scale
        finally:
            rec.decode_end_ns = now_ns()  # a failed decode's CPU shows in the decode stage too

    # ---- compute ---------------------------------------------------------------------------------
    def _compute(self, live: list[Request], slab):
        """Run the prepared batch in its turn: (its requests, BatchOutput or None when it failed, runner).
        A failure ends its requests here, before the turn passes: after a sticky error the next batch must
        find the CPU runner, not the lost one."""
        runner = self._runner
        try:
            if self._failure is not None:
                raise DeviceLost(f"Pipeline: down after a sticky device error ({self._failure})")
            if slab.on_device and slab.prepared_for is not runner:
                live = self._reprepare(live, slab, runner)
            return live, (runner.run(slab) if live else None), runner
        except Exception as e:  # noqa: BLE001
            self._fail_batch([r for r in live if not r.future.done()], e, runner)
            return live, None, runner

    def _complete(self, live, out, runner) -> None:
        failed = out.failed
        stamps = (out.bucket, runner.device_str, out.h2d_start_ns, out.h2d_end_ns, out.compute_start_ns,
                  out.compute_end_ns, out.d2h_end_ns)
        ok = 0
        try:
            for r in live:
                rec = r.record
                (rec.bucket, rec.device, rec.h2d_start_ns, rec.h2d_end_ns, rec.compute_start_ns,
                 rec.compute_end_ns, rec.d2h_end_ns) = stamps
                if r.slot in failed:
                    self._finish(r, exc=ResourceExhausted("Pipeline: out of device memory even at batch size 1"))
                    continue
                self._finish(r, result=list(zip(out.indices[r.slot], out.probs[r.slot], strict=True)), counted=True)
                ok += 1
        finally:
            # One lock per batch, not per request; only the ones that did end ok: should a request raise
            # here, the caller fails it and the rest of the batch, and counts them as errors.
            self._count("ok", ok)

    def _fail_batch(self, live, exc: BaseException, runner: Runner) -> None:
        """End every request of ``live`` with ``exc``. Never raises: a batch worker that died here would
        strand these requests and, holding its turn, every later batch."""
        from aurora_core.runner import is_sticky

        sticky = is_sticky(exc)
        if sticky and not isinstance(exc, DeviceLost):
            exc = DeviceLost(f"Pipeline: sticky device error: {exc}")
        try:
            if sticky:
                # Fall back (or shut down) before these requests end, so that a client retrying on their
                # DeviceLost already finds the CPU runner rather than the lost device.
                self._on_device_lost(exc, runner)
            else:
                log.error("Pipeline: batch failed: %r", exc, exc_info=exc)  # with the model's own traceback
        except Exception:  # noqa: BLE001
            log.exception("Pipeline: handling a failed batch raised")
        finally:
            for r in live:
                self._finish(r, exc=exc)

    def _on_device_lost(self, exc: BaseException, old: Runner) -> None:
        """Fall back to the CPU when allowed; otherwise shut down so that health checks see it."""
        with self._state_lock:
            if self._failure is not None or old is not self._runner:
                return  # already handled: the runner that failed has been replaced or the pipeline is down
            self._ready = False
            self._gpu_decoder = None  # decode on the CPU pool from now on
            if self._cpu_fallback and self._fallback_net is not None:
                log.error("Pipeline: device %s lost (%s); continuing on the CPU", old.device, exc)
                kw = dict(self._runner_kw)
                from aurora_core.aot import cpu_has_bf16

                if resolve_dtype(kw["dtype"]) != torch.bfloat16 or not cpu_has_bf16():
                    kw["dtype"] = None  # fp16 on the CPU is slower than fp32, bf16 too without AVX512-BF16/AMX
                net, self._fallback_net = self._fallback_net, None
                self._retired.update(old.counters)
                # Cleared before the swap: a batch worker reads the runner, then this flag (_prepare).
                self._device_preprocess = False
                try:
                    self._runner = Runner(net, device="cpu", **kw)
                except Exception:  # noqa: BLE001 - no fallback after all: shut down below
                    log.exception("Pipeline: the CPU fallback runner could not be built")
                else:
                    self._ready = True
                    return
            else:
                log.error("Pipeline: device %s lost (%s); shutting down", old.device, exc)
            self._failure = exc
        self.batcher.close()
        self._fail_queued(lambda: DeviceLost(f"Pipeline: device lost before this request ran: {exc}"))


#: Bumped in a forked child: a Pipeline made before the fork compares it instead of calling getpid() (a
#: system call, ~0.3 us) on every submit.
_fork_generation = 0


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _int_arg(name: str, value) -> int:
    """An int (numpy's too), never a bool."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")


_MAX_TIMEOUT_S = 1e9  # ~32 years: longer is no deadline (and its ns would overflow the record's int64)


def _timeout_s(timeout) -> float | None:
    """submit's timeout in seconds: a real number >= 0; inf, or beyond ``_MAX_TIMEOUT_S``, means none."""
    if type(timeout) is float and 0 <= timeout < _MAX_TIMEOUT_S:  # the common case, per request
        return timeout
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"Pipeline.submit: timeout must be a number of seconds or None, got "
                        f"{type(timeout).__name__} {timeout!r}")
    timeout = float(timeout)
    if not timeout >= 0:  # also NaN
        raise ValueError(f"Pipeline.submit: timeout must be >= 0 seconds, got {timeout}")
    return None if timeout >= _MAX_TIMEOUT_S else timeout


def _forked() -> PipelineClosed:
    return PipelineClosed("Pipeline: this process was forked after the Pipeline was created, and the "
                          "pipeline's threads do not survive a fork; create the Pipeline after forking "
                          "(e.g. in each worker process)")


def _lower_priority() -> None:
    """Run the calling thread at nice +10 (Linux: per thread; elsewhere, or when refused, a no-op)."""
    if sys.platform == "linux":
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + 10))
        except OSError:
            pass


def _precise_timers() -> None:
    """Let the calling thread's timed waits end within 1 us of their deadline instead of Linux's default
    50 us timer slack: a batch worker's timed wait is the batch's queue delay, on every request's path.
    Measured on the 2-core VM: Condition.wait(1 ms) overshoot, median 90 -> 41 us."""
    if sys.platform == "linux":
        try:
            import ctypes

            ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK (linux/prctl.h), in ns
        except (OSError, AttributeError):
            pass


def _for_nvjpeg(r: Request, gpu) -> bool:
    """Whether the request goes to the GPU decoder's batched call rather than the CPU pool. The route (its
    header, parsed once) is kept on the request for decode_batch."""
    if gpu is None:
        return False
    if r.route is None:
        r.route = gpu.route(r.data)
    return r.route is not None and r.route[0] == "gpu"


def _gpu_decoder(value, device: torch.device, on_device: bool, limits: dict):
    """The GpuDecoder a pipeline decodes with, or None (see Pipeline's gpu_decode)."""
    from aurora_core.gpu_decode import GpuDecoder, nvjpeg_available

    if isinstance(value, GpuDecoder):
        return value
    mode = _preprocess_mode(value, "gpu_decode")
    if mode == "off":
        return None
    usable = device.type == "cuda" and on_device and nvjpeg_available(device)
    if usable:
        return GpuDecoder(device, **limits)
    if mode == "on":
        raise ValueError(f"Pipeline: gpu_decode='on' needs a CUDA device, preprocessing on it (device_preprocess) "
                         f"and a working nvJPEG (torchvision); got device {device}, device preprocessing "
                         f"{'on' if on_device else 'off'}")
    return None


_DECODE_LIMITS = ("max_pixels", "max_bytes")  # decode()'s limit arguments


def _decode_limits(limits) -> dict:
    """decode_limits checked before the model loads: a typo must not fail every request."""
    from aurora_core.decode import _check_limit

    if limits is None:
        return {}
    if not isinstance(limits, dict):
        raise TypeError(f"Pipeline: decode_limits must be a dict, got {type(limits).__name__}")
    out = {}
    for k, v in limits.items():
        if k not in _DECODE_LIMITS:
            raise ValueError(f"Pipeline: decode_limits accepts {', '.join(_DECODE_LIMITS)}, got {k!r}")
        if isinstance(v, bool):
            raise TypeError(f"Pipeline: decode_limits[{k!r}] must be an int, got bool")
        out[k] = _check_limit("Pipeline: decode_limits", k, v)
    return out


def _preprocess_mode(value, name: str = "device_preprocess") -> str:
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.lower() in ("auto", "on", "off"):
        return value.lower()
    raise ValueError(f"Pipeline: {name} must be 'auto', 'on' or 'off', got {value!r}")


def _triton_available() -> bool:
    try:
        from aurora_core import _dispatch

        return _dispatch.backend_for(torch.device("cuda")) == "triton"
    except Exception:  # noqa: BLE001 - no Triton, or no dispatch module yet: preprocess on the CPU
        return False


class RequestContext:
    """A request opened by ``Pipeline.request()``: its id exists before its data does. Submit it once.

    As a context manager it makes itself the current request (``records.current_request``), so a
    ``Recorder.span`` opened inside is linked to it; ``span()`` links one explicitly, on the pipeline's
    first sink that records spans (a Recorder)."""

    __slots__ = ("pipe", "request_id", "_submitted", "_token")

    def __init__(self, pipe: Pipeline, request_id: int):
        self.pipe, self.request_id, self._submitted, self._token = pipe, request_id, False, None

    def span(self, name: str, **attrs):
        """``with ctx.span("feature_store"):`` times the body as a span of this request."""
        rec = next((s for s in self.pipe._sinks if callable(getattr(s, "span", None))), None)
        if rec is None:
            raise ValueError("RequestContext.span: no sink of this Pipeline records spans; create the Pipeline "
                             "with sink=Recorder(...) (or use rec.span inside 'with pipe.request():')")
        return rec.span(name, request_id=self.request_id, **attrs)

    def submit(self, data, timeout: float | None = None, priority: int = 0) -> Future:
        """``Pipeline.submit`` under this request's id. A second submit is a ValueError."""
        if self._submitted:
            raise ValueError(f"RequestContext.submit: request {self.request_id} was submitted already; "
                             "open a new one with Pipeline.request()")
        self._submitted = True
        return self.pipe._submit(data, timeout, priority, self.request_id)

    def infer(self, data, timeout: float | None = None, priority: int = 0):
        """Blocking submit(...).result()."""
        return self.submit(data, timeout, priority).result()

    async def infer_async(self, data, timeout: float | None = None, priority: int = 0):
        return await asyncio.wrap_future(self.submit(data, timeout, priority))

    def __enter__(self) -> RequestContext:
        self._token = current_request.set(self.request_id)
        return self

    def __exit__(self, *exc) -> None:
        current_request.reset(self._token)
