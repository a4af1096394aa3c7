"""The optimizer: global-norm clipping, then AdamW on a warmup + cosine learning-rate schedule.

Weight decay applies to weight matrices (the embedding included) only: not to biases, norm scales, Mamba's D
nor to A_log (mamba_ssm marks A_log and D "_no_weight_decay", Mamba2's dt_bias too; Mamba1's dt_proj.bias is
spared as a bias by the parameter grouping of the training code it was trained with): decaying A_log towards 0
pulls A towards -1 and decaying the dt bias towards 0 pulls dt towards softplus(0) = 0.69, both shortening the
SSM's memory."""

from __future__ import annotations

from typing import Any, Mapping

import optax

from configs.schema import OptimConfig


def learning_rate_schedule(config: OptimConfig, steps: int) -> optax.Schedule:
    """0 -> learning_rate linearly over warmup_steps, then cosine to learning_rate * end_lr_ratio at ``steps``;
    with decay_steps > 0, constant at learning_rate until the cosine's last decay_steps steps."""
    end_value = config.learning_rate * config.end_lr_ratio
    if config.decay_steps == 0:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps, decay_steps=steps,
            end_value=end_value)
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    stable = optax.constant_schedule(config.learning_rate)
    decay = optax.cosine_decay_schedule(config.learning_rate, config.decay_steps, alpha=config.end_lr_ratio)
    return optax.join_schedules([warmup, stable, decay], [config.warmup_steps, steps - config.decay_steps])


# A_log: 2-D, not a weight matrix; bias: a StackedDense bias is 2-D (model.use_bias: in_proj.bias (2, d_inner))
NO_DECAY_SUFFIXES = (".A_log", ".bias")


def decay_mask(params: Mapping[str, Any]) -> dict[str, bool]:
    """{name: whether weight decay applies} for flat parameters {"layers.0.mixer.in_proj.kernel": array, ...}:
    those of 2 or more dimensions, but A_log and biases."""
    return {name: value.ndim >= 2 and not name.endswith(NO_DECAY_SUFFIXES) for name, value in params.items()}


def make_optimizer(config: OptimConfig, steps: int) -> optax.GradientTransformation:
    """Over flat parameter dicts (experiments.mesh.flatten_params)."""
    adamw = optax.adamw(learning_rate_schedule(config, steps), b1=config.b1, b2=config.b2, eps=config.eps,
                        weight_decay=config.weight_decay, mask=decay_mask)
    # clip_norm 0 keeps the chain's shape (identity's state is clipping's, empty), so that a run resumes with
    # clipping switched on or off (optim.* may change on resume)
    clip = optax.identity() if config.clip_norm == 0 else optax.clip_by_global_norm(config.clip_norm)
    return optax.chain(clip, adamw)
