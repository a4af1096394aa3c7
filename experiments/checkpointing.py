"""Checkpoints of the train state and the data position, with Orbax's CheckpointManager.

A checkpoint is a step directory holding two items: "state" (parameters, optimizer state, step; sharded
arrays) and "data" (the data iterator's position, JSON). Orbax writes each step to a temporary directory and
renames it when complete, so a run killed during a save leaves the previous checkpoints restorable. Saves
are asynchronous: the next training step starts while the arrays are written. Restoring takes the target
shardings, so a checkpoint written on one mesh restores onto any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from configs.schema import ConfigError
from runtime.files import write_failure


class Checkpointer:
    """``create``: whether ``directory`` (and its parents) are created where missing: by a training run, not by
    a reader (a model loaded for evaluate or generate), for which a missing directory is no checkpoint. (Orbax's
    read_only option would log three warnings on every load.)"""

    def __init__(self, directory: str | Path, keep: int, create: bool = True):
        # single_host_load_and_broadcast: with several processes, process 0 lists the steps and broadcasts them, so
        # every process resumes from the same step even where a shared file system (NFS, GCS FUSE) shows one host a
        # stale listing; hosts restoring different steps would train different states, or wait forever in the
        # collectives of a loop that runs a different number of steps on each
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=create,
                                               single_host_load_and_broadcast=True)
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        self.saving = None  # the step of the save started last, until wait() has seen it complete

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_step(self, step: int) -> None:
        """ConfigError naming the steps there are, unless checkpoint ``step`` exists."""
        steps = list(self.manager.all_steps())
        if step not in steps:
            raise ConfigError(f"step: expected one of the checkpoints in {str(self.directory)!r}, {sorted(steps)}, "
                              f"got {step}")

    def check_params(self, step: int, abstract_params: dict) -> None:
        """ConfigError naming the first parameter whose stored shape differs from the config's, or that only one
        side has (Orbax's own error names neither the parameter nor the checkpoint)."""
        stored = ocp.PyTreeCheckpointHandler().metadata(self.directory / str(step) / "state").tree["params"]

        def describe(leaf) -> str:
            return "no such parameter" if leaf is None else f"shape {tuple(leaf.shape)}"

        for name in sorted(set(stored) | set(abstract_params)):
            got, want = stored.get(name), abstract_params.get(name)
            if got is None or want is None or tuple(got.shape) != tuple(want.shape):
                raise ConfigError(f"checkpoint {step} in {str(self.directory)!r}: parameter {name!r} has "
                                  f"{describe(got)}, the config needs {describe(want)} (a config other than "
                                  f"the run's?)")

    def save(self, step: int, state: Any, data_position: dict) -> None:
        """Starts an asynchronous save of ``state`` and ``data_position`` as checkpoint ``step`` (once the previous
        one is complete). A save that fails (a full disk) raises WriteError naming its step and the directory, here
        or from the next save or wait(); the checkpoints before it stay restorable."""
        self.wait()
        self.saving = step
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            data=ocp.args.JsonSave(data_position)), force=True)
        except (OSError, ValueError) as err:  # tensorstore's write errors are ValueErrors
            self.saving = None
            raise write_failure(f"checkpoint step {step} in", self.directory, err) from err

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state placed per the shardings of ``abstract_state``'s ShapeDtypeStructs, data position)."""
        self.check_params(step, abstract_state["params"])
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only state["params"] of checkpoint ``step``, placed per ``abstract_params``' shardings: what a model
        needs, without reading the optimizer state (twice the parameters' bytes for Adam)."""
        self.check_step(step)
        self.check_params(step, abstract_params)
        target = {"params": abstract_params}
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=True)
        with ocp.PyTreeCheckpointer() as reader:
            return reader.restore(self.directory / str(step) / "state", args=args)["params"]

    def wait(self) -> None:
        """Waits for the save in progress; WriteError naming its step where it failed."""
        step, self.saving = self.saving, None
        try:
            self.manager.wait_until_finished()
        except (OSError, ValueError) as err:
            raise write_failure("a checkpoint in" if step is None else f"checkpoint step {step} in", self.directory,
                                err) from err

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree``'s leaves carrying the matching target shardings."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        tree, shardings)
