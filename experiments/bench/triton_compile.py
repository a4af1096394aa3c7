"""Compile the Pallas scan's Triton kernels for a GPU on a machine without one; report ptxas' resource counts.

    python -m experiments.bench.triton_compile [--arch 90]
        [--variants TILE:BLOCK_DIM:NUM_WARPS[:UNROLL][:rows][:pf][:sSPLITS] ...]

For each variant (default: the sweep of experiments/bench/gpu_scan.py) the forward and backward kernels are
lowered for "cuda" at a 7B-layer channel block (bf16 inputs, D, z, delta_bias, softplus), their Triton IR is
compiled by pip's triton down to a cubin for sm_ARCH, and ptxas' register, spill and shared-memory counts are
printed, with the SASS instruction count of each step loop (cuobjdump; the forward has one, the backward two: the
recomputation and the reverse pass). A kernel that cannot compile, or spills, shows here rather than in a
15-minute GPU lease; a step loop's instruction count is its issue cost, one warp instruction per cycle per
scheduler, which bounds the kernel's speed where memory latency is hidden.

How: JAX 0.10's Pallas Triton lowering leaves each kernel as Triton IR (MLIR bytecode) in the backend config of an
XLA custom call (``__gpu$xla.gpu.triton``); this reads it out of a CPU-side lowering, prints it as text in a context
with JAX's Triton dialect, and hands the text to ``triton.compile`` with the kernel's num_warps / num_stages. The
GPU machine compiles the same IR with the Triton that its jaxlib bundles, so this is a close check, not the same
one: a kernel that compiles here could still meet a difference there, and no timing comes out of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments.bench import positive_int
from experiments.bench.gpu_scan import SWEEP_VARIANTS, channels_last_shapes, check_variants, parse_variant
from experiments.timing import format_row

TRITON_CALL = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class KernelIR:
    name: str
    num_warps: int
    num_stages: int
    text: str  # Triton IR (the tt dialect), as MLIR text


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    name: str
    registers: int       # per thread
    spill_bytes: int     # spill stores + spill loads, per thread
    shared_bytes: int    # Triton's shared memory (layout conversions, reductions)
    ptx_lines: int
    loop_instructions: tuple[int, ...]  # SASS instructions in each innermost loop, in code order (step loops)


def kernel_irs(fn, *args, **kwargs) -> list[KernelIR]:
    """The Triton kernels in ``jax.jit(fn)(*args, **kwargs)`` lowered for CUDA (args may be ShapeDtypeStructs)."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    lowered = jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",))
    context = jax_mlir.make_ir_context()
    tt_dialect.register_dialect(context)
    kernels = []

    def visit(operation):
        for region in operation.regions:
            for block in region.blocks:
                for op in block.operations:
                    attrs = op.operation.attributes
                    if op.operation.name == "stablehlo.custom_call" and \
                            ir.StringAttr(attrs["call_target_name"]).value == TRITON_CALL:
                        config = attrs["mhlo.backend_config"]
                        module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes, context=context)
                        kernels.append(KernelIR(ir.StringAttr(config["name"]).value,
                                                ir.IntegerAttr(config["num_warps"]).value,
                                                ir.IntegerAttr(config["num_stages"]).value,
                                                module.operation.get_asm(enable_debug_info=False)))
                    visit(op.operation)

    visit(lowered.compiler_ir("stablehlo").operation)
    if not kernels:
        raise RuntimeError(f"no {TRITON_CALL} custom call in the CUDA lowering: this JAX ({jax.__version__}) "
                           f"lowers Pallas' Triton kernels differently than 0.10 did")
    return kernels


def sm_target(arch: int) -> str:
    """ptxas' name of compute capability ``arch`` (90: sm_90a, the architecture-specific target Triton uses)."""
    return f"sm_{arch}{'a' if arch >= 90 else ''}"


def supported_archs() -> list[int]:
    """The compute capabilities that pip triton's ptxas compiles for, the one compile_kernel runs for each (below
    90 and from 90 on Triton picks two), from their --help: another (0, 88, 95) crashed in Triton's LLVM. From 75
    on: its CUDA 13 cuobjdump no longer disassembles older ones (sm_70 is "deprecated")."""
    from triton.backends.nvidia.compiler import get_ptxas

    found = set()
    for example in (80, 90):
        text = subprocess.run([get_ptxas(example).path, "--help"], capture_output=True, text=True).stdout
        names = set(re.findall(r"'(sm_\w+)'", text))
        found |= {arch for arch in map(int, re.findall(r"'sm_(\d+)'", text))
                  if (arch < 90) == (example < 90) and sm_target(arch) in names and arch >= 75}
    return sorted(found)


def compile_kernel(kernel: KernelIR, arch: int) -> CompiledKernel:
    """Triton IR -> cubin for sm_{arch} with pip's triton; raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, f"{kernel.name}.ttir")
        source.write_text(kernel.text)
        compiled = triton.compile(str(source), target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages,
                                               enable_fp_fusion=True))  # as Triton does by default
        ptx = compiled.asm["ptx"]
        Path(tmp, "k.ptx").write_text(ptx)
        ptxas = get_ptxas(arch).path
        report = subprocess.run([ptxas, f"-arch={sm_target(arch)}", "-v", "-o", str(Path(tmp, "k.cubin")),
                                 str(Path(tmp, "k.ptx"))], capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(Path(ptxas).with_name("cuobjdump")), "-sass", str(Path(tmp, "k.cubin"))],
                              capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return CompiledKernel(kernel.name, registers, spills, compiled.metadata.shared, ptx.count("\n"),
                          innermost_loop_sizes(sass))


def innermost_loop_sizes(sass: str) -> tuple[int, ...]:
    """Instruction counts of the innermost loops in cuobjdump's SASS listing: a loop is a branch back to a lower
    address, innermost when no other loop lies inside it. In these kernels the innermost loops are the step loops
    (one step, or one group of ``unroll`` steps, per iteration), so their size is the issue cost of a step."""
    addresses = [int(a, 16) for a in re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+\S", sass, flags=re.M)]
    loops = [(int(target, 16), int(at, 16))
             for at, target in re.findall(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+0x([0-9a-f]+)",
                                          sass, flags=re.M)
             if int(target, 16) < int(at, 16)]
    innermost = [(start, end) for start, end in loops
                 if not any(start <= s and e <= end and (s, e) != (start, end) for s, e in loops)]
    return tuple(sum(start <= a <= end for a in addresses) for start, end in sorted(innermost))


def scan_kernels(variant: str, *, length: int = 256, groups: int = 1, dim: int | None = None) -> list[KernelIR]:
    """The forward and backward kernels of selective_scan_pallas with a variant's knobs, lowered for CUDA: the
    Falcon Mamba case (bf16 u, delta, z, B, C; fp32 A, D, delta_bias; softplus), one program's worth of channels
    per grid row (the kernel's code does not depend on the batch, the sequence length or the number of blocks)."""
    from ssm.pallas_scan import selective_scan_pallas

    knobs = parse_variant(variant)
    args = channels_last_shapes(1, length, dim or 2 * knobs["block_dim"] * groups, groups)

    def loss(u, delta, A, B, C, D, z, bias):
        out, last = selective_scan_pallas(u, delta, A, B, C, D, z, bias, True, interpret=False, kernel="triton",
                                          **knobs)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(last)

    return kernel_irs(jax.grad(loss, argnums=tuple(range(8))), *args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=positive_int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--variants", nargs="+", default=list(SWEEP_VARIANTS),
                        metavar="TILE:BLOCK_DIM:NUM_WARPS[:UNROLL][:rows][:pf][:sSPLITS]")
    args = parser.parse_args(argv)
    check_variants(parser, args.variants)
    import triton

    supported = supported_archs()
    if args.arch not in supported:
        parser.error(f"--arch: expected a compute capability that pip triton's tools compile and disassemble for "
                     f"({', '.join(map(str, supported))}), got {args.arch}")

    print(f"triton {triton.__version__}, jax {jax.__version__}, sm_{args.arch}")
    for variant in args.variants:
        for kernel in scan_kernels(variant):
            c = compile_kernel(kernel, args.arch)
            print(format_row(dict(variant=variant, kernel=c.name, warps=kernel.num_warps, registers=c.registers,
                                  spill_bytes=c.spill_bytes, shared_bytes=c.shared_bytes, ptx_lines=c.ptx_lines,
                                  step_loop_instructions="/".join(map(str, c.loop_instructions)))))


if __name__ == "__main__":
    main()
