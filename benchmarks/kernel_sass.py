"""The fused Triton kernels compiled for Hopper (sm_90) on any machine, GPU or not: registers, spills, shared
memory and the SASS instruction mix of every launch the ops make at model shapes (XL/1, batch 32 by default).

Static, not a timing: it shows whether a kernel spills registers, how wide its global loads and stores are
(``LDG.E.128`` moves 16 B per thread, plain ``LDG.E`` 4 B or less) and how much shared-memory traffic its layout
conversions cost, so a kernel change made without a GPU can at least be checked for these. Each op's wrapper
runs on CPU tensors with the kernel launches captured instead of run; each captured launch is compiled with the
same specialisation a real launch would get, by Triton's bundled ``ptxas`` / ``nvdisasm``.

    python benchmarks/kernel_sass.py                          # every op at XL/1, batch 32
    python benchmarks/kernel_sass.py --ops qkv_norm_rope --batch 128

Writes JSON to $OUT/kernel_sass.json when OUT is set (or to --json).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":   # the interpreter's kernels cannot be compiled
    sys.exit("kernel_sass.py compiles the kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_json_report  # noqa: E402
from sfd_core.kernels import TRITON_AVAILABLE  # noqa: E402

if not TRITON_AVAILABLE:
    sys.exit("kernel_sass.py compiles Triton kernels: Triton is not installed")

import triton  # noqa: E402
from sfd_core.kernels import adamw_ema as adamw_module  # noqa: E402
from sfd_core.kernels import norm_modulate as norm_module  # noqa: E402
from sfd_core.kernels import qkv_norm_rope as qkv_module  # noqa: E402
from sfd_core.kernels import swiglu as swiglu_module  # noqa: E402

HOPPER = ("cuda", 90, 32)   # backend, compute capability, warp size
KERNEL_MODULES = (adamw_module, norm_module, qkv_module, swiglu_module)


@dataclass
class Launch:
    kernel: object   # the triton.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__.strip("_")

    def constexprs(self) -> dict:
        return {k: v for k, v in self.kwargs.items() if k != "num_warps"}


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, kernel, launches: list[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, tuple(grid), args, kwargs))


@contextmanager
def captured_launches():
    """Within the block, the fused ops' Triton kernels are recorded, not launched; yields the list of launches."""
    launches: list[Launch] = []
    saved = [(m, name, getattr(m, name)) for m in KERNEL_MODULES for name in dir(m)
             if name.startswith("_") and name.endswith("_kernel")]
    for module, name, kernel in saved:
        setattr(module, name, _Recorder(kernel, launches))
    try:
        yield launches
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def compile_for_hopper(launch: Launch):
    """The launch compiled for sm_90 as Triton's launcher would specialise it (dtypes, 16-byte alignment and
    divisibility of the arguments, constexprs, num_warps)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    target = GPUTarget(*HOPPER)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound_args, specialization,
                                                              options)
    return compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _triton_tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def ptxas_usage(ptx: str) -> dict[str, int]:
    """Registers per thread and spill bytes, from ``ptxas -v`` on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([_triton_tool("ptxas"), "-v", f"--gpu-name=sm_{HOPPER[1]}a", str(src), "-o",
                               str(Path(tmp) / "kernel.o")], capture_output=True, text=True, check=True)
    log = done.stderr

    def number(pattern: str) -> int:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0
    return {"registers": number(r"Used (\d+) registers"), "spill_store_bytes": number(r"(\d+) bytes spill stores"),
            "spill_load_bytes": number(r"(\d+) bytes spill loads")}


# opcode families counted in the SASS (the first dotted part of each instruction's mnemonic)
FAMILIES = {"global load": ("LDG",), "global store": ("STG",), "shared load": ("LDS",), "shared store": ("STS",),
            "barrier": ("BAR",), "shuffle": ("SHFL",), "special function": ("MUFU",), "tensor core": ("HMMA", "HGMMA"),
            "atomic / reduction": ("RED", "ATOM", "ATOMG")}


def sass_mix(cubin: bytes) -> dict:
    """Static instruction counts of the kernel's SASS: the total, the families above, and global loads/stores by
    access width (bits per thread; 32 where the mnemonic names none)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([_triton_tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    families = Counter()
    widths = {"global load": Counter(), "global store": Counter()}
    for op in opcodes:
        base = op.split(".")[0]
        family = next((f for f, bases in FAMILIES.items() if base in bases), None)
        if family is None:
            continue
        families[family] += 1
        if family in widths:
            bits = next((int(part) for part in op.split(".")[1:] if part in ("64", "128")), None)
            if bits is None:
                bits = 16 if ".U16" in op or ".S16" in op else 8 if ".U8" in op or ".S8" in op else 32
            widths[family][bits] += 1
    return {"instructions": len(opcodes), **{f: families[f] for f in FAMILIES},
            "global load widths": dict(sorted(widths["global load"].items())),
            "global store widths": dict(sorted(widths["global store"].items()))}


OPS = ("qkv_norm_rope", "swiglu", "norm_modulate", "adamw_ema")


def op_launches(ops: list[str], batch: int, tokens: int = 256, hidden: int = 1152, heads: int = 16,
                mlp_hidden: int = 3072) -> list[tuple[str, Launch]]:
    """(op, launch) for each kernel launch of the forward and backward of ``ops`` at these shapes (bf16
    activations, fp32 norm weights and conditioning in bf16, as in the bf16-weights training step)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    head_dim, grid = hidden // heads, int(round(tokens ** 0.5))
    rows = []

    def empty(*shape, dtype=bf16):
        return torch.empty(*shape, dtype=dtype)

    with captured_launches() as launches:
        for op in ops:
            start = len(launches)
            if op == "qkv_norm_rope":
                qkv, bias, norm_w = empty(batch, tokens, 3 * hidden), empty(3 * hidden), empty(head_dim, dtype=fp32)
                trig = empty(grid * grid, head_dim, dtype=fp32)
                qkv_module.qkv_norm_rope(qkv, norm_w, norm_w, trig, trig, heads, 1e-6, bias)
                grad = empty(batch, tokens, heads, head_dim)
                qkv_module.qkv_norm_rope_backward(grad, grad, grad, qkv, norm_w, norm_w, trig, trig, heads, 1e-6, bias)
            elif op == "swiglu":
                h, bias = empty(batch, tokens, 2 * mlp_hidden), empty(2 * mlp_hidden)
                swiglu_module.swiglu(h, bias)
                swiglu_module.swiglu_backward(empty(batch, tokens, mlp_hidden), h, bias)
            elif op == "norm_modulate":
                x, cond, weight = empty(batch, tokens, hidden), empty(batch, hidden), empty(hidden, dtype=fp32)
                norm_module.norm_modulate(x, weight, cond, cond, 1e-6)
                norm_module.residual_norm_modulate(x, x, cond, weight, cond, cond, 1e-6, empty(hidden))
                norm_module.norm_modulate_backward(x, x, x, x, cond, weight, cond, bf16, 1e-6)
                norm_module.norm_modulate_token_sums(x, x, empty(batch, tokens, dtype=fp32), x, x, empty(hidden))
            elif op == "adamw_ema":
                weights = {name: [empty(4096, dtype=fp32)] for name in adamw_module.TABLE_ROWS if name != "working"}
                weights.update(grad=[empty(4096)], step=[torch.zeros(1)], working=[empty(4096)])
                table, _ = adamw_module.pointer_table(weights, working_bf16=True)
                blocks = adamw_module.block_map([4096], adamw_module.program_values(True), table.device)
                adamw_module.adamw_ema_(table, blocks, weights["step"], working_bf16=True, lr=1e-4, beta1=0.9,
                                        beta2=0.95, eps=1e-8, weight_decay=0.0, ema_decay=0.9999)
            else:
                raise ValueError(f"unknown op {op!r}; choose from {OPS}")
            rows += [(op, launch) for launch in launches[start:]]
    return rows



def kernel_report(op: str, launch: Launch) -> dict:
    compiled = compile_for_hopper(launch)
    return {"op": op, "kernel": launch.name, "grid": list(launch.grid), "num_warps": launch.kwargs.get("num_warps", 4),
            "constexprs": {k: v if isinstance(v, (int, float, bool, str)) else str(v)
                           for k, v in launch.constexprs().items()},
            "shared_bytes": compiled.metadata.shared, **ptxas_usage(compiled.asm["ptx"]),
            **sass_mix(compiled.asm["cubin"])}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma list of {list(OPS)}")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = [kernel_report(op, launch) for op, launch in op_launches(args.ops.split(","), args.batch)]
    print(f"\n### fused kernels compiled for sm_{HOPPER[1]} by Triton {triton.__version__} (XL/1 shapes, batch "
          f"{args.batch})\n")
    print("| kernel | warps | grid | regs | spill B | smem B | SASS | LDG (bits: n) | STG (bits: n) | LDS | STS "
          "| BAR | SHFL |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['num_warps']} | {'x'.join(map(str, r['grid']))} | {r['registers']} "
              f"| {r['spill_store_bytes']} | {r['shared_bytes']} | {r['instructions']} "
              f"| {r['global load widths']} | {r['global store widths']} | {r['shared load']} "
              f"| {r['shared store']} | {r['barrier']} | {r['shuffle']} |")
    report = {"target": list(HOPPER), "triton": triton.__version__, "torch": torch.__version__, "batch": args.batch,
              "results": rows}
    write_json_report(report, "kernel_sass", args.json)
    return report


if __name__ == "__main__":
    main()
