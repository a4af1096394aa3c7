"""The Pallas scan's Triton kernels compile to an sm_90 (H100/H200) cubin on this CPU machine, through pip's triton
(experiments/bench/triton_compile.py): what the jax.export test in test_pallas_scan.py cannot see (Triton IR to
PTX to SASS, register allocation) is checked here on every run. The GPU compiles the same IR with the Triton its
jaxlib bundles, a close but not identical compiler; nothing here is timed."""

from __future__ import annotations

import pytest

from experiments.bench import gpu_scan, triton_compile

triton = pytest.importorskip("triton", reason="pip's triton is in the test extra (pyproject.toml)")


def compiled(variant, names=("selective_scan_fwd", "selective_scan_bwd")):
    kernels = triton_compile.scan_kernels(variant)
    assert [k.name for k in kernels] == list(names)
    return {k.name: triton_compile.compile_kernel(k, arch=90) for k in kernels}


def test_default_kernels_compile_for_hopper_without_spills():
    """The default knobs (64-step tiles, 32 channels per 1-warp program, one step per load group): both kernels
    compile, within the 255-register limit and with no spills (a spill is a local-memory round trip on every
    step of the recurrence)."""
    from ssm.pallas_scan import DEFAULT_NUM_WARPS, DEFAULT_TILE, MAX_BLOCK_DIM

    for kernel in compiled(f"{DEFAULT_TILE}:{MAX_BLOCK_DIM}:{DEFAULT_NUM_WARPS}").values():
        assert kernel.spill_bytes == 0, kernel
        assert 0 < kernel.registers <= 255, kernel


def test_step_loops_issue_no_more_instructions_than_measured():
    """The step loops' SASS instruction counts (64:32:1:rows, the bf16 Falcon Mamba case) stay at the level of
    2026-11-30, 175 (forward) and 151 / 738 (backward: recomputation / reverse pass) per step, from 364 and
    309 / 934 before the exponentials became exp2 (libdevice's expf is ~9 instructions around its MUFU.EX2) and
    B, C were handed to the kernels in fp32 (every thread unpacked a step's 2n bf16 values): a regression shows
    here."""
    kernels = compiled("64:32:1:rows")
    forward, backward = kernels["selective_scan_fwd"], kernels["selective_scan_bwd"]
    assert len(forward.loop_instructions) == 1 and 140 < forward.loop_instructions[0] < 200, forward
    recompute, reverse = backward.loop_instructions
    assert 120 < recompute < 180 and 600 < reverse < 800, backward


def test_prefetch_compiles_without_spills():
    """":pf" (loads carried one step ahead): both kernels compile without spills, the forward's step loop one step
    long (the loads of the next step, not a second step's arithmetic: under 1.3x the plain loop's instructions)."""
    prefetch, plain = compiled("64:32:1:rows:pf"), compiled("64:32:1:rows")
    for kernel in prefetch.values():
        assert kernel.spill_bytes == 0, kernel
    assert plain["selective_scan_fwd"].loop_instructions[0] < prefetch["selective_scan_fwd"].loop_instructions[0] \
        < 1.3 * plain["selective_scan_fwd"].loop_instructions[0]


def test_grouped_loads_compile_unrolled():
    """unroll=4 (grouped loads): both kernels compile, their loop bodies four steps long (the PTX of each more
    than twice the one-step kernel's), the forward without spills."""
    grouped = compiled("64:32:1:4")
    single = compiled("64:32:1")  # the default: compiled by the test above, a cache hit in triton's cache
    assert grouped["selective_scan_fwd"].spill_bytes == 0, grouped
    assert grouped["selective_scan_fwd"].ptx_lines > 2 * single["selective_scan_fwd"].ptx_lines
    assert grouped["selective_scan_bwd"].ptx_lines > 2 * single["selective_scan_bwd"].ptx_lines


def test_every_sweep_variant_parses():
    for variant in gpu_scan.SWEEP_VARIANTS:
        gpu_scan.parse_variant(variant)


def test_sequence_splits_compile():
    """":s4" (forward and backward split over the sequence in 4): a first kernel for the splits' end states, the
    forward (a grid axis more), a first kernel for the splits' adjoints, the backward (a grid axis more), none
    spilling. The first kernels' step loops are short beside the ones they enable (the forward's end states:
    no output, no C, no gate; the adjoints: no state, 147 instructions a step on 2026-12-02 against the reverse
    pass's 737), and the forward's and backward's own steps are unchanged (within 5%)."""
    split = compiled("64:32:1:rows:s4", ("selective_scan_split_ends", "selective_scan_fwd",
                                         "selective_scan_split_adjoints", "selective_scan_bwd"))
    plain = compiled("64:32:1:rows")
    for kernel in split.values():
        assert kernel.spill_bytes == 0, kernel
    ends, forward = (split[k].loop_instructions[0] for k in ("selective_scan_split_ends", "selective_scan_fwd"))
    assert ends < forward < 1.05 * plain["selective_scan_fwd"].loop_instructions[0], split
    adjoints, backward = split["selective_scan_split_adjoints"], split["selective_scan_bwd"]
    assert adjoints.loop_instructions[0] < 0.25 * backward.loop_instructions[1], split
    for got, unsplit in zip(backward.loop_instructions, plain["selective_scan_bwd"].loop_instructions):
        assert got < 1.05 * unsplit, split
