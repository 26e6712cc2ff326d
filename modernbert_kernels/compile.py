"""
Compile the Triton kernels for an NVIDIA GPU that need not be here: every autotune config, ahead of time,
through Triton's own compiler and the ptxas it ships, and report what each costs on that chip (shared
memory, registers, bytes spilled to the stack). The CPU tests run the kernels in Triton's interpreter,
which checks what they compute but generates no GPU code; this is how a machine without a GPU finds out
that a change no longer compiles for one, no longer fits its shared memory, or spills.

    python -m modernbert_kernels.compile                            # sm_80 and sm_90, head_dim 64 and 128, bf16
    python -m modernbert_kernels.compile --arch 90 --head_dim 64 --check
    python -m modernbert_kernels.compile --arch 90 --dtype fp32     # the exact-fp32 configs (torch's default precision)

--check exits 1 unless every config compiles and each (kernel, head_dim, window) keeps at least one config
that fits the chip's shared memory without spilling (the autotuner skips configs that do not fit, so one
good config is what a launch needs). Arguments are specialised as a real launch specialises them: pointers
and strides 16-aligned, which is what lets Triton pipeline the loads.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("modernbert_kernels.compile: TRITON_INTERPRET=1 is set; the interpreter compiles nothing, unset it")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from . import flash_attn, rotary  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes of shared memory per block
ATTENTION = (flash_attn._fwd_kernel, flash_attn._bwd_dq_kernel, flash_attn._bwd_dkdv_kernel)


def _signature(fn, dtype):
    """Triton type of each runtime argument, read off the kernels' naming: upper-case names are pointers."""
    types = {"TABLE": "*i32", "LSE": "*fp32", "DELTA": "*fp32", "DQ_ACC": "*fp32", "SEQ_BUCKET": "i32",
             "qk_scale": "fp32", "sm_scale": "fp32"}
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = types.get(name, f"*{dtype}" if name.isupper() else "i32")
    return sig


def compile_kernel(fn, arch, constants, num_warps, num_stages, dtype="bf16"):
    """Compile one specialisation of a @triton.jit function for sm_<arch>; returns Triton's compiled kernel."""
    sig = _signature(fn, dtype)
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if sig[name].startswith("*") or name.startswith("stride")}
    src = ASTSource(fn, sig, constants, aligned)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def resources(compiled):
    """(shared bytes, registers per thread, stack bytes per thread) of a compiled kernel; stack is spilling."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
    return compiled.metadata.shared, int(regs), int(stack)


def specialisations(head_dims, windows, precision="tf32"):
    """What a launch may compile: (kernel name, head_dim, window, block, fn, constexprs, num_warps, num_stages)
    for the RoPE and delta kernels and for every autotune config of the attention kernels that `precision`
    keeps (both backward variants of the dK/dV kernel)."""
    fa = flash_attn
    for head_dim in head_dims:
        yield ("_rotary_kernel", head_dim, "", str(rotary.BLOCK_T), rotary._rotary_kernel,
               dict(HALF=head_dim // 2, BLOCK_T=rotary.BLOCK_T, TRANSPOSE=False), rotary.NUM_WARPS,
               rotary.NUM_STAGES)
        yield ("_bwd_delta_kernel", head_dim, "", str(fa.DELTA_BLOCK), fa._bwd_delta_kernel,
               dict(HEAD_DIM=head_dim, BLOCK_T=fa.DELTA_BLOCK), fa.DELTA_WARPS, 1)
        for kernel in ATTENTION:
            variants = {"": {}} if kernel is not fa._bwd_dkdv_kernel else {"": dict(ATOMIC_DQ=False),
                                                                           "+atomic_dq": dict(ATOMIC_DQ=True)}
            for window in windows:
                for suffix, extra in variants.items():
                    for config in fa.autotune_configs(kernel, precision):
                        block = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}"
                        constants = dict(HEAD_DIM=head_dim, WINDOW=window, SLOT=fa.SLOT, PRECISION=precision,
                                         **extra, **config.kwargs)
                        yield (kernel.fn.__name__ + suffix, head_dim, window, block, kernel.fn, constants,
                               config.num_warps, config.num_stages)


def report(archs, head_dims, windows, dtype="bf16"):
    """Compile every specialisation; print one row each; return the problems found as strings. dtype bf16,
    fp16, or fp32 as flash_attn launches it: "fp32" exact on the CUDA cores (PRECISION ieee, torch's default
    matmul precision "highest"), "tf32" on the tensor cores."""
    precision = "ieee" if dtype == "fp32" else "tf32"
    dtype = "fp32" if dtype == "tf32" else dtype
    problems = []
    fitting = {}  # (arch, kernel, head_dim, window) -> how many of its configs fit without spilling
    print(f"{'arch':>5} {'kernel':<26} {'head':>4} {'window':>6} {'block':>8} {'warps':>5} {'stages':>6} "
          f"{'shared KiB':>10} {'regs':>5} {'spill B':>7}  fits")
    for arch in archs:
        for name, head_dim, window, block, fn, constants, warps, stages in specialisations(head_dims, windows,
                                                                                          precision):
            row = f"{arch:>5} {name:<26} {head_dim:>4} {window:>6} {block:>8}"
            group = (arch, name, head_dim, window)
            fitting.setdefault(group, 0)
            try:
                compiled = compile_kernel(fn, arch, constants, warps, stages, dtype)
            except Exception as e:  # a compile error is a finding, reported with the config
                while e.__cause__ is not None:  # Triton chains an error through each call site
                    e = e.__cause__
                lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
                problems.append(f"sm_{arch} {name} head_dim {head_dim} window {window} {block}: "
                                f"{type(e).__name__}: {lines[-1]}")
                print(f"{row}  does not compile")
                continue
            shared, regs, stack = resources(compiled)
            over = shared > SHARED_LIMIT[arch]
            fitting[group] += not over and stack == 0
            verdict = "over shared limit" if over else ("SPILLS" if stack else "yes")
            print(f"{row} {warps:>5} {stages:>6} {shared / 1024:>10.1f} {regs:>5} {stack:>7}  {verdict}")
    problems += [f"sm_{arch} {name} head_dim {head_dim} window {window}: no config fits "
                 f"{SHARED_LIMIT[arch] // 1024} KiB of shared memory without spilling"
                 for (arch, name, head_dim, window), n in fitting.items() if not n]
    return problems


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT),
                        help="compute capabilities, e.g. 80 (A100) and 90 (H100/H200)")
    parser.add_argument("--head_dim", type=int, nargs="+", default=[64, 128], choices=[16, 32, 64, 128])
    parser.add_argument("--window", type=int, nargs="+", default=[-1, 64], help="-1 is global attention")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "tf32"],
                        help="fp32: exact fp32 products (torch's default precision); tf32: fp32 on tensor cores")
    parser.add_argument("--check", action="store_true", help="exit 1 on any problem")
    args = parser.parse_args()
    t0 = time.perf_counter()
    problems = report(args.arch, args.head_dim, args.window, args.dtype)
    print(f"{len(problems)} problem(s) in {time.perf_counter() - t0:.0f} s")
    for p in problems:
        print(f"  {p}")
    if args.check and problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
