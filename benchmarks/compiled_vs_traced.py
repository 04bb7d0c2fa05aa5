"""The CPU model, per image at batch 16: eager vs the former TorchScript trace + freeze vs AOTInductor.

    python benchmarks/compiled_vs_traced.py --model mobilenet_v3_small --model resnet50 [--bf16]

One process, the variants interleaved rep by rep, medians; torch on one thread as the CPU server runs it
(the other core decodes). Also the agreement rule's measurement on the 200 photo variants: fp32 eager vs
fp32 compiled and, with --bf16 (needs AVX512-BF16 or AMX), fp32 eager vs bf16 compiled. A cold compile is
timed too; a second run loads from the disk cache (``aurora_core.aot.cache_dir()``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from aurora_core import aot
from aurora_core.agreement import agreement, agreement_images
from aurora_core.runner import Runner, load_model


def traced(r: Runner):
    """What the runner did before: trace + torch.jit.freeze of the channels_last model, head around it."""
    x = torch.randn((2, *r.input_shape)).to(r.dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices: this is the path being replaced
        frozen = torch.jit.freeze(torch.jit.trace(r.model, x, check_trace=False))
    k = r.k

    def head(x):
        logits = frozen(x.to(r.dtype).contiguous(memory_format=torch.channels_last))
        return torch.topk(torch.softmax(logits.float(), 1), k, 1)
    return head


def calibrated(name: str, imgs: torch.Tensor):
    """The random-init model with its BatchNorm statistics re-estimated on the photo variants. Without
    weights (never downloaded) a random mobilenet_v3_small gives ~1e-9 logits for every image (top-1 is
    class 0 everywhere) and resnet50 one class for all: agreement would be 100% whatever the precision.
    With data statistics the logits depend on the image, so agreement means something (still not a
    trained model's)."""
    m = load_model(name)
    m.train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.reset_running_stats()
            mod.momentum = None  # a plain average over the batches
    with torch.no_grad():
        for i in range(0, len(imgs), 25):
            m(imgs[i: i + 25])
    return m.eval()


def per_image_ms(fns: dict, x: torch.Tensor, reps: int) -> dict:
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for f in fns.values():
            f(x)
        for _ in range(reps):
            for k, f in fns.items():
                t = time.perf_counter()
                f(x)
                times[k].append((time.perf_counter() - t) * 1e3 / len(x))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="torchvision name (repeatable; default mobilenet_v3_small)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="also bf16 (eager and compiled)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, bf16 engines: {aot.cpu_has_bf16()}, "
          f"torch {torch.__version__}, {a.threads} thread(s), batch {a.batch}", flush=True)
    imgs = agreement_images(224)
    for name in a.model or ["mobilenet_v3_small"]:
        t = time.monotonic()
        net = calibrated(name, imgs)
        with torch.inference_mode():
            top1 = net(imgs[:100]).argmax(1)
        print(f"{name}: {len(set(top1.tolist()))} distinct top-1 classes over 100 photo variants", flush=True)
        r = Runner(net, buckets=(1, a.batch), top_k=5, compile=True)
        print(f"{name} fp32: compile {r.compile_state} from {r.compile_source} in {time.monotonic() - t:.1f} s",
              flush=True)
        fns = {"eager": r.head, "traced": traced(r), "compiled": r.compiled}
        if a.bf16:
            t = time.monotonic()
            rb = Runner(calibrated(name, imgs), dtype="bf16", buckets=(1, a.batch), top_k=5, compile=True)
            print(f"{name} bf16: compile {rb.compile_state} from {rb.compile_source} in "
                  f"{time.monotonic() - t:.1f} s", flush=True)
            fns["eager_bf16"] = rb.head
            if rb.compiled is not None:
                fns["compiled_bf16"] = rb.compiled
        x = torch.randn((a.batch, 3, 224, 224), generator=torch.Generator().manual_seed(0))
        ms = per_image_ms(fns, x, a.reps)
        base = ms["compiled"]
        print(f"{name}: ms per image (median of {a.reps}): " + ", ".join(
            f"{k} {v:.2f} ({v / base:.2f}x compiled)" for k, v in ms.items()), flush=True)
        print(f"{name}: compiled fp32 vs eager fp32: {agreement(r.head, r.compiled, imgs)}", flush=True)
        if a.bf16:
            print(f"{name}: eager bf16 vs eager fp32: {agreement(r.head, rb.head, imgs)}", flush=True)
        if a.bf16 and rb.compiled is not None:
            print(f"{name}: compiled bf16 vs eager fp32: {agreement(r.head, rb.compiled, imgs)}", flush=True)


if __name__ == "__main__":
    main()
