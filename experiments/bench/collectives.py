"""The collectives in a run's compiled train step: how many of each kind, and the bytes of their results.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m experiments.bench.collectives tiny_falcon_mamba mesh.data=2 mesh.fsdp=2 mesh.tensor=2

Compiles (does not run) the train step of the preset with its overrides on the run's mesh, where CPU devices
can stand in for accelerators, and reads the collectives out of the compiled HLO. A static count for comparing
sharding choices (docs/TRAINING.md), not a timing: it does not say how long the communication takes.
"""

from __future__ import annotations

import math
import re
import sys

import jax

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
_OP = re.compile(r"= (\([^=]*?\)|\w+\[[\d,]*\]\S*) (" + "|".join(KINDS) + r")(-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")  # XLA's /*index=5*/ in a tuple of more than five: its "=" stopped _OP's tuple


def compiled_step_hlo(run) -> str:
    """The optimized HLO text of ``run``'s train step compiled on its mesh (experiments.train)."""
    from experiments import data as data_lib
    from experiments.train import jit_train_step, prepare

    setup = prepare(run)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for k, v in data_lib.batch_at(run.data, run.model.vocab_size, run.seed, 0).items()}
    step = jit_train_step(setup, run, donate=False)
    return step.lower(jax.eval_shape(setup.init_state), batch).compile().as_text()


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """{kind: (count, bytes of the results)} of the collectives in an HLO text (async ones counted at -start)."""
    found = {}
    for result, kind, _ in _OP.findall(_COMMENT.sub("", hlo)):
        nbytes = sum(_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
                     for dtype, dims in _ARRAY.findall(result))
        count, total = found.get(kind, (0, 0))
        found[kind] = (count + 1, total + nbytes)
    return found


def main(argv=None) -> int:
    from configs import load_config
    from experiments.cli import run_config_command

    def command(argv):
        run = load_config(argv[0], argv[1:])
        found = collectives(compiled_step_hlo(run))
        mesh = " x ".join(f"{axis}={getattr(run.mesh, axis)}" for axis in ("data", "fsdp", "tensor"))
        print(f"{argv[0]}, mesh {mesh} ({jax.device_count()} {jax.default_backend()} devices)")
        for kind, (count, nbytes) in sorted(found.items()):
            print(f"{kind:>20} {count:5d} ops {nbytes / 1e6:10.3f} MB")
        print(f"{'total':>20} {sum(c for c, _ in found.values()):5d} ops "
              f"{sum(b for _, b in found.values()) / 1e6:10.3f} MB")
        return 0

    return run_config_command(__doc__, argv, command)


if __name__ == "__main__":
    sys.exit(main())
