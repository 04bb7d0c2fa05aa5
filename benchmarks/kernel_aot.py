#!/usr/bin/env python3
"""Compile a Triton preprocess kernel ahead of time, with no GPU, and report what its machine code does.

    python benchmarks/kernel_aot.py kernels/preprocess.py banded [--archs 80,90] [--out-dtypes fp16,bf16]
    git show REV:kernels/preprocess.py > /tmp/old.py && python benchmarks/kernel_aot.py /tmp/old.py banded

For every autotune config of the implementation (banded or dense), each arch and output dtype: one JSON
line with whether the PTX has tensor-core mma, local memory, 16-byte global loads (ld.global[.nc].v4)
and 1-byte global loads, and ptxas' registers and spill bytes. Pointers are declared 16-byte aligned,
as Triton's launcher specializes them for torch's allocations. Triton runs ptxas -v itself but drops
its log, so the same ptxas call is made again here. Run without TRITON_INTERPRET (it would swap
triton.jit for the interpreter). tests/test_triton_preprocess.py runs this; benchmarks/RESULTS.md
(issue 16) holds its figures for the byte-per-lane and the wide-load kernels.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile


def report(kernel_file: str, impl: str, archs=(80, 90), out_dtypes=("fp16", "bf16")):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    spec = importlib.util.spec_from_file_location("_aurora_preprocess_aot", kernel_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kernel, configs = (
        (mod._banded_kernel, mod._banded_configs)
        if impl == "banded"
        else (mod._preprocess_kernel, mod._configs)
    )
    sig = {"src": "*u8", "iparams": "*i64", "fparams": "*fp32", "out": "*fp16"}
    sig.update({k: "i32" for k in ("so_n", "so_c", "so_y", "so_x")})
    sig.update({k: "fp32" for k in ("m0", "m1", "m2", "r0", "r1", "r2")})
    sig.update({k: "constexpr" for k in ["CROP", *configs()[0].kwargs]})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(4)}
    for cap in archs:
        for dtype in out_dtypes:
            for cfg in configs():
                sig["out"] = "*" + dtype
                src = ASTSource(
                    fn=kernel.fn, signature=sig, constexprs={"CROP": 224, **cfg.kwargs}, attrs=attrs
                )
                target = GPUTarget("cuda", cap, 32)
                ptx = triton.compile(src, target=target, options={"num_warps": cfg.num_warps}).asm["ptx"]
                with tempfile.TemporaryDirectory() as d:
                    path = os.path.join(d, "k.ptx")
                    with open(path, "w") as f:
                        f.write(ptx)
                    cmd = [get_ptxas(cap).path, "-v", f"--gpu-name={sm_arch_from_capability(cap)}", path]
                    log = subprocess.run(
                        [*cmd, "-o", path + ".o"], capture_output=True, text=True, check=True
                    ).stderr
                yield {
                    "impl": impl,
                    "arch": cap,
                    "out": dtype,
                    "config": {**cfg.kwargs, "num_warps": cfg.num_warps},
                    "mma": "mma" in ptx,
                    "ld_local": "ld.local" in ptx,
                    "ld_v4": len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.", ptx)),
                    "ld_u8": len(re.findall(r"ld\.global(?:\.\w+)*\.[usb]8 ", ptx)),
                    "regs": int(re.search(r"Used (\d+) registers", log).group(1)),
                    "spill_bytes": sum(map(int, re.findall(r"(\d+) bytes spill", log))),
                }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel_file")
    ap.add_argument("impl", choices=("banded", "dense"))
    ap.add_argument("--archs", default="80,90", help="compute capabilities, e.g. 80,90")
    ap.add_argument("--out-dtypes", default="fp16,bf16", help="output dtypes: fp32, fp16, bf16")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: under the interpreter triton.jit compiles nothing")
    archs = [int(x) for x in a.archs.split(",")]
    for row in report(a.kernel_file, a.impl, archs, a.out_dtypes.split(",")):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
