"""What steer's Triton kernels cost a GPU's registers, read without a GPU: each kernel is compiled
for a CUDA target (sm_90, Hopper, by default) with the ``ptxas`` that Triton's wheel ships, and the
cubin's resource usage and instruction mix are printed.

    python experiments/bench/kernel_resources.py [--arch 90] [--tiles 64,64,8 32,32,8]

* ``regs`` registers per thread (255 is the most a thread can have), ``spill`` the bytes of local
  memory ("stack") per thread that did not fit: any spill in the inner loop of these kernels
  costs orders of magnitude (the first tiled QK fix spilled 2.7-26 KB a thread and ran 533x
  slower than SDPA fwd+bwd on an H200);
* ``mma``: tensor-core instructions (HGMMA/HMMA), ``ffma``: fp32 fused multiply-adds.

It says nothing about time: :mod:`bench_gpu` measures that where a device is lent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

KERNELS = {  # name: (kernel attribute of steer.patching.qk_tiled, pointer args, fixed constexprs)
    "row_fix (patched q)": ("_row_fix_kernel", ["q_ptr", "k_ptr", "qa_ptr", "ka_ptr", "v_ptr", "gz_ptr"], {"ALT": 1}),
    "row_fix (patched k)": ("_row_fix_kernel", ["q_ptr", "k_ptr", "qa_ptr", "ka_ptr", "v_ptr", "gz_ptr"], {"ALT": 2}),
    "key_fix_sum": ("_key_fix_kernel", ["q_ptr", "k_ptr", "ka_ptr", "v_ptr", "gz_ptr"], {}),
}


def resources(kernel: str, dtype: str, tiles: tuple[int, int, int], arch: int = 90, d: int = 64, S: int = 2048,
              window: bool = False, softcap: bool = False) -> dict:
    """Compile one QK-fix kernel for ``sm_{arch}`` (no GPU needed) and read its cubin:
    ``{"regs", "spill", "mma", "ffma"}``. ``dtype``: the operands, ``"bf16"``/``"fp16"``/``"fp32"``.
    Needs a process where Triton was imported without ``TRITON_INTERPRET=1`` (the tests run this
    script in its own process for that reason)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from steer.patching import qk_tiled

    attr, ptrs, fixed = KERNELS[kernel]
    bt, bs, warps = tiles
    sig = {p: f"*{dtype}" for p in ptrs}
    sig.update(kv_ptr="*i8", out_ptr="*fp32", T="i32", H="i32", HKV="i32", off="i32", window="i32",
               scaling="fp32", softcap="fp32")
    const = dict(S=S, D=d, BD=max(16, d), BT=bt, BS=bs, WINDOW=window, SOFTCAP=softcap, F32=dtype == "fp32", **fixed)
    sig.update({c: "constexpr" for c in const})
    k = triton.compile(ASTSource(fn=getattr(qk_tiled, attr), signature=sig, constexprs=const),
                       target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": 2})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    line = next(x for x in res.splitlines() if "REG:" in x)
    fields = dict(f.split(":") for f in line.split() if ":" in f)
    lines = sass.splitlines()
    return {"regs": int(fields["REG"]), "spill": int(fields["STACK"]),
            "mma": sum(bool(re.search(r"\bH(G)?MMA\b", x)) for x in lines),
            "ffma": sum(bool(re.search(r"\bFFMA\b", x)) for x in lines)}


def main(argv=None) -> int:
    from steer.patching.qk_tiled import TILES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--tiles", nargs="*", help="BT,BS,warps configs to report (default: steer's TILES)")
    ap.add_argument("--variants", action="store_true", help="also with a sliding window and soft-capping")
    ap.add_argument("--json", action="store_true", help="print one JSON list of every result")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_resources compiles kernels: run it without TRITON_INTERPRET=1.")
    plans = ([("bf16", tuple(map(int, t.split(",")))) for t in a.tiles] + [("fp32", tuple(map(int, t.split(","))))
                                                                           for t in a.tiles]
             if a.tiles else [("bf16", TILES["half"]), ("fp32", TILES["fp32"])])
    rows = []
    for dtype, tiles in plans:
        for name in KERNELS:
            for ws in ((False, True) if a.variants else (False,)):
                r = resources(name, dtype, tiles, a.arch, window=ws, softcap=ws)
                rows.append({"kernel": name, "dtype": dtype, "tiles": tiles, "window_softcap": ws, **r})
                if not a.json:
                    print(f"sm_{a.arch} {dtype} tiles {tiles}: {name:20s}{' window+softcap' if ws else ''} "
                          f"regs {r['regs']:3d}  spill {r['spill']:6d} B  mma {r['mma']:3d}  ffma {r['ffma']:5d}",
                          flush=True)
    if a.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
