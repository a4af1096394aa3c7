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


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_position: dict) -> None:
        """Starts an asynchronous save of ``state`` and ``data_position`` as checkpoint ``step``."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_position)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """(state placed per the shardings of ``abstract_state``'s ShapeDtypeStructs, data position)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree``'s leaves carrying the matching target shardings."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        tree, shardings)
