"""The optimizer: global-norm clipping, then AdamW on a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import optax

from configs.schema import OptimConfig


def learning_rate_schedule(config: OptimConfig, steps: int) -> optax.Schedule:
    """0 -> learning_rate linearly over warmup_steps, then cosine to learning_rate * end_lr_ratio at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps, decay_steps=steps,
        end_value=config.learning_rate * config.end_lr_ratio)


def make_optimizer(config: OptimConfig, steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(config, steps), b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay)
    if config.clip_norm == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
