"""The optimizer: global-norm clipping, then AdamW on a warmup + cosine learning-rate schedule.

Weight decay applies to weight matrices only: not to biases, norm scales, Mamba's D (all 1-D) nor to A_log
(mamba_ssm marks A_log, D and dt_proj.bias "_no_weight_decay"): decaying A_log towards 0 pulls A towards -1
and decaying the dt bias towards 0 pulls dt towards softplus(0) = 0.69, both shortening the SSM's memory."""

from __future__ import annotations

from typing import Any, Mapping

import optax

from configs.schema import OptimConfig


def learning_rate_schedule(config: OptimConfig, steps: int) -> optax.Schedule:
    """0 -> learning_rate linearly over warmup_steps, then cosine to learning_rate * end_lr_ratio at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps, decay_steps=steps,
        end_value=config.learning_rate * config.end_lr_ratio)


NO_DECAY_SUFFIXES = (".A_log",)


def decay_mask(params: Mapping[str, Any]) -> dict[str, bool]:
    """{name: whether weight decay applies} for flat parameters {"layers.0.mixer.in_proj.kernel": array, ...}."""
    return {name: value.ndim >= 2 and not name.endswith(NO_DECAY_SUFFIXES) for name, value in params.items()}


def make_optimizer(config: OptimConfig, steps: int) -> optax.GradientTransformation:
    """Over flat parameter dicts (experiments.mesh.flatten_params)."""
    adamw = optax.adamw(learning_rate_schedule(config, steps), b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=decay_mask)
    if config.clip_norm == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
