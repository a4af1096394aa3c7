"""README.md's Python tour, run as written on tiny transformers checkpoints: only its paths are replaced and the
names it leaves to the reader (prompt_ids, ids, the scan's inputs) defined. A README edit that breaks the tour, or
an API change that the README does not follow, fails here."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import numpy as np
from transformers import FalconConfig, FalconForCausalLM, FalconMambaConfig, FalconMambaForCausalLM

import ssm
from tests.hf_models import build_and_save, torch_logits

README = Path(__file__).resolve().parent.parent / "README.md"
MAMBA_DIR, FALCON_DIR, OUT_DIR = '"path/to/falcon-mamba-7b"', '"path/to/falcon-7b"', '"out/"'
SCAN_PART = "# The selective scan"


def tour_source() -> str:
    """The README's first Python block."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def test_the_python_tour_runs_as_written(tmp_path):
    source = tour_source()
    for literal in (MAMBA_DIR, FALCON_DIR, OUT_DIR, SCAN_PART):
        assert literal in source, f"the tour no longer has {literal}: update this test with it"
    torch_mamba = build_and_save(FalconMambaConfig, FalconMambaForCausalLM, tmp_path / "mamba", seed=1,
                                 vocab_size=64, hidden_size=16, num_hidden_layers=2, state_size=8, expand=2,
                                 conv_kernel=4, time_step_rank=4, tie_word_embeddings=False)
    build_and_save(FalconConfig, FalconForCausalLM, tmp_path / "falcon", seed=2, vocab_size=64, hidden_size=16,
                   num_hidden_layers=1, num_attention_heads=2, multi_query=True, parallel_attn=True)
    source = (source.replace(MAMBA_DIR, repr(str(tmp_path / "mamba")))
              .replace(FALCON_DIR, repr(str(tmp_path / "falcon"))).replace(OUT_DIR, repr(str(tmp_path / "out"))))
    rng = np.random.default_rng(0)
    batch, dim, dstate, seqlen = 2, 8, 4, 40
    scope = dict(
        prompt_ids=rng.integers(0, 64, (1, 50)), ids=rng.integers(0, 64, (2, 30)),
        u=rng.standard_normal((batch, dim, seqlen), np.float32),
        delta=rng.standard_normal((batch, dim, seqlen), np.float32),
        A=-np.exp(rng.standard_normal((dim, dstate), np.float32)),
        B=rng.standard_normal((batch, dstate, seqlen), np.float32),
        C=rng.standard_normal((batch, dstate, seqlen), np.float32), D=rng.standard_normal(dim, np.float32),
        z=rng.standard_normal((batch, dim, seqlen), np.float32), delta_bias=rng.standard_normal(dim, np.float32))
    models, scan = source.split(SCAN_PART)  # run in two parts: the scan's part rebinds out
    exec(compile(models, str(README), "exec"), scope)  # noqa: S102 - the README's own code
    assert scope["logits"].shape == (1, 3, 64) and scope["logits"].dtype == np.float32
    assert scope["last_logits"].shape == scope["next_logits"].shape == (1, 64)
    assert scope["logprobs"].shape == (2, 29)
    assert scope["out"].tokens.shape == (1, 64)

    exec(compile(SCAN_PART + scan, str(README), "exec"), scope)  # noqa: S102
    want, want_last = ssm.selective_scan_fn(*(scope[name] for name in "u delta A B C D z delta_bias".split()),
                                            delta_softplus=True, return_last_state=True, impl="reference")
    np.testing.assert_allclose(np.asarray(scope["out"]), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(scope["last"]), np.asarray(want_last), rtol=1e-5, atol=1e-5)
    # "transformers' FalconMambaForCausalLM loads this": the exported weights give the source model's logits
    exported = FalconMambaForCausalLM.from_pretrained(tmp_path / "out").eval()
    probe = rng.integers(0, 64, (1, 12))
    np.testing.assert_array_equal(torch_logits(exported, probe), torch_logits(torch_mamba, probe))


# import name -> distribution name in pyproject.toml, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "orbax": "orbax-checkpoint", "tensorboardX": "tensorboardx"}
PACKAGES = ("configs", "runtime", "ssm", "transformer", "experiments")


def _unguarded_imports(tree):
    """Top-level module names imported outside a ``try`` that catches ImportError."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            guarded |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_a_plain_install_has_what_the_commands_import():
    """`pip install -e .` (no extra) gets every module the packages import, but for the benchmarks (which compare
    with PyTorch, README.md names their extras) and imports guarded by an ImportError handler."""
    root = README.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[<>=!~;\[ ]", dep, maxsplit=1)[0].lower().replace("_", "-")
                for dep in project["dependencies"]}
    needed = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "bench" in path.relative_to(root).parts:
                continue
            for name in _unguarded_imports(ast.parse(path.read_text(), str(path))):
                if name not in sys.stdlib_module_names and name not in PACKAGES and name != "__future__":
                    needed.setdefault(DISTRIBUTIONS.get(name, name).lower().replace("_", "-"), path.name)
    missing = {dist: where for dist, where in needed.items() if dist not in declared}
    assert not missing, f"imported but not in pyproject.toml's dependencies: {missing}"
