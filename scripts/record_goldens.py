"""Records golden inputs and outputs for tests/test_golden.py.

    python scripts/record_goldens.py oracle [--out tests/golden]   # float64 NumPy oracle (tests/oracle.py), any machine
    python scripts/record_goldens.py cuda   [--out tests/golden]   # mamba_ssm's / causal_conv1d's CUDA kernels (GPU)
    python scripts/record_goldens.py torch_ref [--out tests/golden] # their PyTorch references, on CPU

Writes <out>/<backend>/<case>.npz (inputs as ``in_<name>``, outputs as ``out_<name>``, options as ``opt_<name>``)
and <out>/<backend>/provenance.json, into a new folder that replaces the old set only once both are written. The
cuda and torch_ref backends also record the scan's backward pass: a seeded cotangent of ``out`` as ``cot_out`` and
mamba_ssm's gradient of sum(out * cot_out) for every input as ``grad_<name>`` (its backward kernel's, or autograd
through selective_scan_ref), and for bf16 cases the same gradients computed in fp32 on the same values as
``fp32_grad_<name>`` (the float64 oracle has no backward). Inputs come from fixed seeds and are identical for every
backend; bf16 cases store their inputs already rounded to bf16 (as float32), so every implementation sees the
same values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, dtype, batch, dim, dstate, seqlen, B/C layout, D, z, delta_bias, softplus). mamba_ssm's last_state is
# wrong for constant B (REFERENCE.md): every case here has variable B, so last_state is recorded for all.
SCAN_CASES = [
    ("scan_fp32_bnl_all", "float32", 2, 8, 8, 256, "bnl", True, True, True, True),
    ("scan_fp32_g2_plain", "float32", 2, 8, 8, 200, "g2", False, False, False, False),
    ("scan_fp32_g1_Dbias", "float32", 2, 8, 16, 129, "g1", True, False, True, True),
    ("scan_bf16_g2_all", "bfloat16", 2, 8, 8, 256, "g2", True, True, True, True),
    ("scan_bf16_bnl_z", "bfloat16", 2, 8, 8, 100, "bnl", False, True, False, True),
    # past mamba_ssm's CUDA kernel's 2048-step chunk, which it carries the state across (2 groups of 2 channels:
    # not the TPU kernel's shape, whose interpreter is slow at this length)
    ("scan_fp32_g2_2100", "float32", 1, 4, 4, 2100, "g2", True, True, True, True),
]
# (name, dtype, batch, dim, dstate, B/C groups or 0 for (batch, dstate), D, z, dt_bias, dt_softplus)
STATE_UPDATE_CASES = [
    ("state_update_fp32_all", "float32", 2, 64, 16, 0, True, True, True, True),
    ("state_update_fp32_g2", "float32", 2, 64, 16, 2, False, False, False, False),
    ("state_update_bf16_all", "bfloat16", 2, 64, 16, 0, True, True, True, True),
]
# (name, dtype, batch, dim, seqlen, kernel, bias, activation, initial_states given (then the final states are
# recorded too: return_final_states))
CONV_CASES = [
    ("conv_fn_fp32_silu", "float32", 2, 64, 100, 4, True, "silu", False),
    ("conv_fn_fp32_plain", "float32", 2, 64, 37, 3, False, None, False),
    ("conv_fn_bf16_silu", "bfloat16", 2, 64, 100, 4, True, "silu", False),
    ("conv_fn_fp32_initial", "float32", 2, 64, 50, 4, True, "silu", True),
]
# (name, dtype, batch, dim, kernel, bias, activation, x's seqlen (None: x is (batch, dim)), conv_state's length)
CONV_UPDATE_CASES = [
    ("conv_update_fp32_silu", "float32", 2, 64, 4, True, "silu", None, 4),
    ("conv_update_bf16_plain", "bfloat16", 2, 64, 4, False, None, None, 4),
    ("conv_update_fp32_3steps", "float32", 2, 64, 4, True, "silu", 3, 6),  # 3 tokens, a longer state
]


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 array holding values exactly representable in ``dtype`` (bf16 rounding via ml_dtypes)."""
    import ml_dtypes

    x = np.asarray(x, np.float32)
    return x.astype(ml_dtypes.bfloat16).astype(np.float32) if dtype == "bfloat16" else x


def scan_inputs(seed, dtype, batch, dim, dstate, seqlen, bc, D, z, bias, softplus):
    """Like tests/test_scan.make_inputs; u, delta, B, C, z in ``dtype`` (rounded), A, D, delta_bias fp32."""
    rng = np.random.default_rng(seed)
    shape = (batch, dstate, seqlen) if bc == "bnl" else (batch, int(bc[1:]), dstate, seqlen)
    low = lambda x: _round(x, dtype)  # noqa: E731
    inputs = dict(
        u=low(rng.standard_normal((batch, dim, seqlen))),
        delta=low(rng.standard_normal((batch, dim, seqlen)) if softplus else 0.5 * rng.random((batch, dim, seqlen))),
        A=_round(-np.exp(rng.standard_normal((dim, dstate))), "float32"),
        B=low(rng.standard_normal(shape)),
        C=low(rng.standard_normal(shape)),
    )
    if D:
        inputs["D"] = _round(rng.standard_normal(dim), "float32")
    if z:
        inputs["z"] = low(rng.standard_normal((batch, dim, seqlen)))
    if bias:
        inputs["delta_bias"] = _round(rng.standard_normal(dim) if softplus else 0.5 * rng.random(dim), "float32")
    return inputs


def state_update_inputs(seed, dtype, batch, dim, dstate, groups, D, z, bias, softplus):
    rng = np.random.default_rng(seed)
    low = lambda x: _round(x, dtype)  # noqa: E731
    bc_shape = (batch, dstate) if groups == 0 else (batch, groups, dstate)
    inputs = dict(state=_round(rng.standard_normal((batch, dim, dstate)), "float32"),
                  x=low(rng.standard_normal((batch, dim))), dt=low(rng.standard_normal((batch, dim))),
                  A=_round(-np.exp(rng.standard_normal((dim, dstate))), "float32"),
                  B=low(rng.standard_normal(bc_shape)), C=low(rng.standard_normal(bc_shape)))
    if D:
        inputs["D"] = _round(rng.standard_normal(dim), "float32")
    if z:
        inputs["z"] = low(rng.standard_normal((batch, dim)))
    if bias:
        inputs["dt_bias"] = _round(rng.standard_normal(dim), "float32")
    return inputs


def conv_inputs(seed, dtype, batch, dim, seqlen, kernel, bias, initial=False):
    rng = np.random.default_rng(seed)
    inputs = dict(x=_round(rng.standard_normal((batch, dim, seqlen)), dtype),
                  weight=_round(rng.standard_normal((dim, kernel)) / kernel, dtype))
    if bias:
        inputs["bias"] = _round(rng.standard_normal(dim), dtype)
    if initial:
        inputs["initial_states"] = _round(rng.standard_normal((batch, dim, kernel - 1)), dtype)
    return inputs


def conv_update_inputs(seed, dtype, batch, dim, kernel, bias, seqlen=None, state_len=None):
    rng = np.random.default_rng(seed)
    inputs = dict(x=_round(rng.standard_normal((batch, dim) if seqlen is None else (batch, dim, seqlen)), dtype),
                  conv_state=_round(rng.standard_normal((batch, dim, state_len or kernel)), dtype),
                  weight=_round(rng.standard_normal((dim, kernel)) / kernel, dtype))
    if bias:
        inputs["bias"] = _round(rng.standard_normal(dim), dtype)
    return inputs


# ----------------------------------------------------------------------------------------------------------
# backends: each returns the outputs of the four ops as float32 NumPy arrays


class OracleBackend:
    name = "oracle"
    conv_error = None  # why the backend cannot record the conv cases (causal_conv1d missing), or None

    def scan(self, inputs, softplus, dtype):
        from tests.oracle import selective_scan_oracle

        out, last = selective_scan_oracle(**inputs, delta_softplus=softplus)
        return dict(out=out, last_state=last)

    def state_update(self, inputs, softplus, dtype):
        from tests.oracle import selective_scan_oracle

        # one step of the scan from ``state`` is selective_state_update
        step = {k: (v[..., None] if k in ("x", "dt", "z", "B", "C") else v) for k, v in inputs.items()}
        out, new_state = selective_scan_oracle(
            step["x"], step["dt"], step["A"], step["B"], step["C"], step.get("D"), step.get("z"),
            step.get("dt_bias"), softplus, initial_state=step["state"])
        return dict(out=out[..., 0], state=new_state)

    def conv_fn(self, inputs, activation, dtype):
        from tests.oracle import causal_conv1d_oracle

        initial = inputs.get("initial_states")
        out, last = causal_conv1d_oracle(np.swapaxes(inputs["x"], 1, 2), inputs["weight"].T, inputs.get("bias"),
                                         None if initial is None else np.swapaxes(initial, 1, 2))
        out = np.swapaxes(out, 1, 2)
        outputs = dict(out=_silu64(out) if activation else out)
        if initial is not None:
            outputs["final_states"] = np.swapaxes(last, 1, 2)
        return outputs

    def conv_update(self, inputs, activation, dtype):
        from tests.oracle import causal_conv1d_oracle

        state, x = (np.asarray(inputs[k], np.float64) for k in ("conv_state", "x"))
        steps = x if x.ndim == 3 else x[:, :, None]
        kernel = inputs["weight"].shape[1]
        out, _ = causal_conv1d_oracle(np.swapaxes(steps, 1, 2), inputs["weight"].T, inputs.get("bias"),
                                      np.swapaxes(state[:, :, state.shape[2] - (kernel - 1):], 1, 2))
        out = np.swapaxes(out, 1, 2)
        out = out if x.ndim == 3 else out[:, :, 0]
        new_state = np.concatenate([state, steps], axis=-1)[:, :, steps.shape[2]:]
        return dict(out=_silu64(out) if activation else out, conv_state=new_state)

    def provenance(self):
        return {"backend": "oracle",
                "what": "float64 NumPy oracle of tests/oracle.py (written from the math); NOT the CUDA kernels. "
                        "Outputs are float64 values stored as float32.",
                "numpy": np.__version__, "python": platform.python_version()}


def _silu64(x):
    x = np.asarray(x, np.float64)
    return x / (1.0 + np.exp(-x))


def mamba_state_update(state, x, dt, A, B, C, D, z, dt_bias, softplus, reference=False):
    """mamba_ssm's Triton selective_state_update (``reference``: its PyTorch selective_state_update_ref, the same
    signature) on ssm.selective_state_update's layout (torch tensors; state updated in place). Its 3-D form takes
    only B, C (batch, dstate); grouped B, C (batch, groups, dstate), groups of dim / groups channels, go through its
    head form with nheads = dim and headdim 1 (head h reads group h // (nheads / groups)), on views of the same
    tensors."""
    import torch
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update, selective_state_update_ref

    update = selective_state_update_ref if reference else selective_state_update
    # 2.3.2's launch reads D's and dt_bias's strides even when they are None (`*(...) if x is not None else 0`
    # raises): zeros add nothing
    zeros = torch.zeros(x.shape[1], device=x.device, dtype=torch.float32)
    D, dt_bias = (zeros if t is None else t for t in (D, dt_bias))
    if B.dim() == 2:
        return update(state, x, dt, A, B, C, D, z, dt_bias, softplus)
    heads = lambda t: None if t is None else t.unsqueeze(-1)  # noqa: E731  (..., dim) -> (..., nheads, 1)
    out = update(state.unsqueeze(2), heads(x), heads(dt), A.unsqueeze(1), B, C, heads(D), heads(z), heads(dt_bias),
                 softplus)
    return out.squeeze(-1)


class TorchBackend:
    """mamba_ssm 2.3.2.post1's and causal_conv1d 1.7.0's functions through torch on ``device``: their CUDA and
    Triton kernels, or (``reference``) their PyTorch references, the functions their own tests check the kernels
    against: selective_scan_ref, selective_state_update_ref, causal_conv1d_ref, causal_conv1d_update_ref."""

    name, device, reference = "", "", False
    conv_error = None  # why the conv cases cannot be recorded (causal_conv1d missing), or None

    def __init__(self):
        import torch

        self.torch = torch
        # causal_conv1d is built separately from mamba_ssm on the GPU machine: without it the scan and
        # state-update cases are still recorded, and provenance.json says why the conv cases are not
        try:
            import causal_conv1d  # noqa: F401
        except ImportError as error:
            self.conv_error = f"{type(error).__name__}: {error}"

    def _t(self, x, dtype):
        torch = self.torch
        return None if x is None else torch.tensor(np.asarray(x, np.float32), device=self.device).to(
            getattr(torch, dtype))

    def _np(self, x):
        return x.detach().float().cpu().numpy()

    def _scan(self, inputs, softplus, dtype, requires_grad, reference=False):
        """mamba_ssm's selective_scan_fn (``reference``: its PyTorch selective_scan_ref) on the inputs (u, delta, B,
        C, z in ``dtype``, the rest fp32): (the input tensors, out, last_state)."""
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref

        t = {k: self._t(v, dtype if k in ("u", "delta", "B", "C", "z") else "float32").requires_grad_(requires_grad)
             for k, v in inputs.items()}
        out, last = (selective_scan_ref if reference or self.reference else selective_scan_fn)(
            t["u"], t["delta"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"), t.get("delta_bias"), softplus, True)
        return t, out, last

    def scan(self, inputs, softplus, dtype):
        _, out, last = self._scan(inputs, softplus, dtype, requires_grad=False)
        return dict(out=self._np(out), last_state=self._np(last))

    def scan_grads(self, inputs, softplus, dtype, cot, fp32_reference=False):
        """The backward (the kernel's, or the reference's through autograd): d sum(out.float() * cot) / d every
        input, in each input's dtype; with ``fp32_reference``, the same gradients computed in fp32
        (selective_scan_ref, autograd) on the same values: what tests/test_golden.check_scan_grad measures a bf16
        case's gradients against."""
        t, out, _ = self._scan(inputs, softplus, "float32" if fp32_reference else dtype, requires_grad=True,
                               reference=fp32_reference)
        (out.float() * self._t(cot, "float32")).sum().backward()
        return {k: self._np(v.grad) for k, v in t.items()}

    def state_update(self, inputs, softplus, dtype):
        state = self._t(inputs["state"], "float32")
        low = {k: self._t(v, dtype if k in ("x", "dt", "B", "C", "z") else "float32") for k, v in inputs.items()}
        out = mamba_state_update(state, low["x"], low["dt"], low["A"], low["B"], low["C"], low.get("D"),
                                 low.get("z"), low.get("dt_bias"), softplus, self.reference)
        return dict(out=self._np(out), state=self._np(state))

    def conv_fn(self, inputs, activation, dtype):
        """causal_conv1d_fn (or causal_conv1d_ref); with initial_states, also the final states it returns. The CUDA
        kernel takes initial states only in the channel-last layout (x and the states (batch, dim, L) with dim
        contiguous): both go in as such views."""
        from causal_conv1d.causal_conv1d_interface import causal_conv1d_fn, causal_conv1d_ref

        t = {k: self._t(v, dtype) for k, v in inputs.items()}
        conv = causal_conv1d_ref if self.reference else causal_conv1d_fn
        if "initial_states" not in t:
            return dict(out=self._np(conv(t["x"], t["weight"], t.get("bias"), activation=activation)))
        channel_last = lambda x: x.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
        out, final = conv(channel_last(t["x"]), t["weight"], t.get("bias"),
                          initial_states=channel_last(t["initial_states"]), return_final_states=True,
                          activation=activation)
        return dict(out=self._np(out), final_states=self._np(final))

    def conv_update(self, inputs, activation, dtype):
        from causal_conv1d.causal_conv1d_interface import causal_conv1d_update, causal_conv1d_update_ref

        t = {k: self._t(v, dtype) for k, v in inputs.items()}
        update = causal_conv1d_update_ref if self.reference else causal_conv1d_update
        out = update(t["x"], t["conv_state"], t["weight"], t.get("bias"), activation=activation)
        return dict(out=self._np(out), conv_state=self._np(t["conv_state"]))

    def provenance(self):
        import mamba_ssm

        torch = self.torch
        if self.conv_error is None:
            import causal_conv1d

            conv_version = causal_conv1d.__version__
        else:
            conv_version = f"not recorded ({self.conv_error})"
        return {"backend": self.name, "torch": torch.__version__, "mamba_ssm": mamba_ssm.__version__,
                "causal_conv1d": conv_version, "python": platform.python_version()}


class CudaBackend(TorchBackend):
    """mamba_ssm's selective_scan_fn and Triton selective_state_update, causal_conv1d's CUDA kernels."""

    name, device = "cuda", "cuda"

    def __init__(self):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("backend cuda: expected a CUDA GPU visible to torch, got torch.cuda.is_available() False")
        super().__init__()

    def provenance(self):
        import subprocess

        torch = self.torch
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
        return {**super().provenance(), "what": "mamba_ssm selective_scan_fn (CUDA), mamba_ssm Triton "
                "selective_state_update, causal_conv1d_fn / causal_conv1d_update (CUDA)",
                "gpu": torch.cuda.get_device_name(0), "nvidia_smi": smi, "cuda": torch.version.cuda}


class TorchRefBackend(TorchBackend):
    """The same packages' PyTorch references on CPU. They need neither a GPU nor the CUDA extensions, which both
    packages import unguarded: where those do not import, empty stand-in modules take their names (REFERENCE.md;
    the packages themselves installed without building them, as tests/golden/README.md says)."""

    name, device, reference = "torch_ref", "cpu", True

    def __init__(self):
        import importlib.util
        import types

        for extension in ("selective_scan_cuda", "causal_conv1d_cuda"):
            if extension not in sys.modules and importlib.util.find_spec(extension) is None:  # (a stand-in has no spec)
                sys.modules[extension] = types.ModuleType(extension)
        try:
            import mamba_ssm  # noqa: F401
        except ImportError as error:
            raise SystemExit(f"backend torch_ref: expected mamba_ssm 2.3.2.post1 to import (tests/golden/README.md "
                             f"says how to install it without CUDA), got {type(error).__name__}: {error}")
        super().__init__()

    def provenance(self):
        return {**super().provenance(), "what": "mamba_ssm selective_scan_ref (outputs and autograd gradients) "
                "and selective_state_update_ref, causal_conv1d_ref / causal_conv1d_update_ref: the PyTorch "
                "references the packages' own tests check their kernels against, in torch on CPU; NOT the CUDA "
                "kernels", "platform": platform.platform()}


def record(backend, out_dir: Path) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(name, kind, inputs, options, outputs, extra=None):
        arrays = {f"in_{k}": np.asarray(v, np.float32) for k, v in inputs.items()}
        arrays.update({f"out_{k}": np.asarray(v, np.float32) for k, v in outputs.items()})
        arrays.update({k: np.asarray(v, np.float32) for k, v in (extra or {}).items()})
        arrays.update({f"opt_{k}": np.asarray(v) for k, v in options.items()})
        arrays["opt_kind"] = np.asarray(kind)
        np.savez_compressed(out_dir / f"{name}.npz", **arrays)
        written.append(name)

    for seed, (name, dtype, batch, dim, dstate, seqlen, bc, D, z, bias, softplus) in enumerate(SCAN_CASES):
        inputs = scan_inputs(100 + seed, dtype, batch, dim, dstate, seqlen, bc, D, z, bias, softplus)
        extra = None
        if hasattr(backend, "scan_grads"):  # out has u's shape
            cot = np.random.default_rng(500 + seed).standard_normal(inputs["u"].shape).astype(np.float32)
            grads = backend.scan_grads(inputs, softplus, dtype, cot)
            extra = {"cot_out": cot, **{f"grad_{k}": v for k, v in grads.items()}}
            if dtype == "bfloat16":
                fp32 = backend.scan_grads(inputs, softplus, dtype, cot, fp32_reference=True)
                extra.update({f"fp32_grad_{k}": v for k, v in fp32.items()})
        save(name, "scan", inputs, dict(dtype=dtype, softplus=softplus), backend.scan(inputs, softplus, dtype),
             extra)
    for seed, (name, dtype, batch, dim, dstate, groups, D, z, bias, softplus) in enumerate(STATE_UPDATE_CASES):
        inputs = state_update_inputs(200 + seed, dtype, batch, dim, dstate, groups, D, z, bias, softplus)
        save(name, "state_update", inputs, dict(dtype=dtype, softplus=softplus),
             backend.state_update(inputs, softplus, dtype))
    if backend.conv_error is not None:
        print(f"conv cases not recorded: {backend.conv_error}", file=sys.stderr)
        return written
    for seed, (name, dtype, batch, dim, seqlen, kernel, bias, activation, initial) in enumerate(CONV_CASES):
        inputs = conv_inputs(300 + seed, dtype, batch, dim, seqlen, kernel, bias, initial)
        save(name, "conv_fn", inputs, dict(dtype=dtype, activation=activation or ""),
             backend.conv_fn(inputs, activation, dtype))
    for seed, (name, dtype, batch, dim, kernel, bias, activation, seqlen, state_len) in enumerate(CONV_UPDATE_CASES):
        inputs = conv_update_inputs(400 + seed, dtype, batch, dim, kernel, bias, seqlen, state_len)
        save(name, "conv_update", inputs, dict(dtype=dtype, activation=activation or ""),
             backend.conv_update(inputs, activation, dtype))
    return written


def write_set(backend, out_dir: Path, command: str) -> list[str]:
    """Records ``backend``'s cases and their provenance.json in a new folder beside ``out_dir``, then puts it in
    out_dir's place: a run that fails part-way (a kernel's error, a crash, no nvidia-smi for the provenance) leaves
    the set that was there as it was, never new goldens without a provenance or under an older one."""
    new = out_dir.with_name(f".{out_dir.name}.new-{os.getpid()}")
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    shutil.rmtree(new, ignore_errors=True)
    try:
        cases = record(backend, new)
        provenance = {**backend.provenance(), "cases": cases,
                      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "command": command}
        (new / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        replaced = out_dir.exists()
        if replaced:
            out_dir.rename(old)
        try:
            new.rename(out_dir)
        except OSError:
            if replaced:
                old.rename(out_dir)
            raise
    finally:
        shutil.rmtree(new, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return cases


BACKENDS = {backend.name: backend for backend in (OracleBackend, CudaBackend, TorchRefBackend)}


def main(argv=None):
    from experiments.bench import check_out_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backend", choices=sorted(BACKENDS))
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "golden")
    args = parser.parse_args(argv)
    for path in (args.out, args.out / args.backend):  # before a backend starts or anything is written
        check_out_dir(parser, path)
    backend = BACKENDS[args.backend]()
    out_dir = args.out / backend.name
    cases = write_set(backend, out_dir, " ".join(["python", "scripts/record_goldens.py"]
                                                 + (sys.argv[1:] if argv is None else list(argv))))
    print(f"wrote {len(cases)} cases and provenance.json to {out_dir}")


if __name__ == "__main__":
    main()
