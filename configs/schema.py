"""Typed config dataclasses: one schema for both model families, the mesh and the run.

Field names of the model configs follow transformers' config classes (FalconMambaConfig, FalconConfig) so
that a reader who knows those finds the same words here. Every field is validated in __post_init__; errors
name the field, what was expected and what came.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

COMPUTE_DTYPES = ("float32", "bfloat16")
SCAN_IMPLS = ("auto", "reference", "sequential", "chunked", "pallas")  # ssm.scan.IMPLS
ATTENTION_IMPLS = ("auto", "xla", "blockwise")
ROPE_SCALING_TYPES = (None, "linear", "dynamic")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key, the expected and the received value."""


def _require(condition: bool, key: str, expected: str, value: Any) -> None:
    if not condition:
        raise ConfigError(f"config field {key!r}: expected {expected}, got {value!r}")


def _positive_int(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
                 "a positive integer", value)


def _positive_number(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(is_number(value) and math.isfinite(value) and value > 0, name, "a finite positive number", value)


def _check_types(obj: Any) -> None:
    """The bool and str fields hold a bool / a str (None where the hint allows it): a config built in Python is
    not read through the loader's type checks, and alibi='false' is truthy."""
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), str(f.type)
        if hint == "bool":
            _require(isinstance(value, bool), f.name, "true or false", value)
        elif hint in ("str", "str | None"):
            _require(isinstance(value, str) or (value is None and hint != "str"), f.name,
                     "a string" + (" or null" if hint != "str" else ""), value)


def _check_token_ids(config: Any) -> None:
    """pad / bos / eos ids: None or non-negative integers; eos_token_id may be several (a list in config.json,
    kept as a tuple: generation stops at any of them). Not bounded by vocab_size: transformers' own defaults (11)
    exceed a tiny test vocabulary, and only generate's default stop tokens read them (checked there)."""
    if isinstance(config.eos_token_id, list):
        object.__setattr__(config, "eos_token_id", tuple(config.eos_token_id))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, name)
        ids = value if name == "eos_token_id" and isinstance(value, tuple) and value else (value,)
        _require(value is None or all(is_int(i) and i >= 0 for i in ids), name,
                 "None or a non-negative integer" + (" or a non-empty list of them" if name == "eos_token_id" else ""),
                 value)


def _choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    _require(value in choices, name, f"one of {list(choices)}", value)


@dataclass(frozen=True)
class FalconMambaConfig:
    """Falcon Mamba (and plain Mamba-1 with ``use_mixer_norms=False``).

    Math-relevant fields mirror transformers' FalconMambaConfig; ``compute_dtype``, ``scan_impl`` and
    ``scan_chunk_size`` are ours.
    """

    family: ClassVar[str] = "falcon_mamba"

    vocab_size: int = 65024
    hidden_size: int = 4096
    num_hidden_layers: int = 64
    state_size: int = 16
    intermediate_size: int | None = None  # None: 2 x hidden_size (transformers' expand 2)
    conv_kernel: int = 4
    time_step_rank: int | Literal["auto"] | None = None  # None or "auto" (transformers'): ceil(hidden_size / 16)
    use_bias: bool = False
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    # The three weightless RMS norms on dt, B and C that make Falcon Mamba differ from Mamba-1.
    use_mixer_norms: bool = True
    mixer_rms_eps: float = 1e-6
    residual_in_fp32: bool = True
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    pad_token_id: int | None = 11
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 11  # a tuple: several end-of-sequence tokens
    # Initialisation, used when a model is built from scratch: mamba_ssm's scheme (the time_step_* fields for
    # dt_proj, rescale_prenorm_residual for out_proj; embeddings N(0, 0.02), as mamba_ssm's _init_weights).
    # initializer_range is transformers' field (its own init draws the embeddings and Linear layers from
    # N(0, initializer_range)), carried through config.json import/export and not used by ours.
    initializer_range: float = 0.1
    time_step_scale: float = 1.0
    time_step_min: float = 1e-3
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_init_scheme: Literal["random", "constant"] = "random"
    rescale_prenorm_residual: bool = False
    # Ours: numerics and kernels.
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    scan_impl: str = "auto"
    scan_chunk_size: int = 256
    # The fields above that were None and got their derived value (configs.loader.replace derives them anew).
    derived: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.time_step_rank, str) and self.time_step_rank == "auto":  # transformers' word for null
            object.__setattr__(self, "time_step_rank", None)
        object.__setattr__(self, "derived", tuple(name for name in ("intermediate_size", "time_step_rank")
                                                  if getattr(self, name) is None))
        _check_types(self)
        _positive_int(self, "hidden_size")
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 2 * self.hidden_size)
        if self.time_step_rank is None:
            object.__setattr__(self, "time_step_rank", self.auto_time_step_rank(self.hidden_size))
        _require(is_int(self.time_step_rank) and self.time_step_rank > 0, "time_step_rank",
                 "a positive integer, 'auto' or null (ceil(hidden_size / 16))", self.time_step_rank)
        _positive_int(self, "vocab_size", "hidden_size", "num_hidden_layers", "state_size",
                      "intermediate_size", "conv_kernel", "scan_chunk_size")
        _positive_number(self, "layer_norm_epsilon", "mixer_rms_eps", "time_step_min", "time_step_max",
                         "time_step_floor", "initializer_range", "time_step_scale")
        _require(self.time_step_min <= self.time_step_max, "time_step_min",
                 f"<= time_step_max ({self.time_step_max})", self.time_step_min)
        _require(self.state_size <= 256, "state_size", "<= 256 (mamba_ssm's limit)", self.state_size)
        _require(self.hidden_act == "silu", "hidden_act", "'silu' (the only activation Mamba uses)",
                 self.hidden_act)
        _choice(self, "time_step_init_scheme", ("random", "constant"))
        _choice(self, "compute_dtype", COMPUTE_DTYPES)
        _choice(self, "param_dtype", COMPUTE_DTYPES)
        _choice(self, "scan_impl", SCAN_IMPLS)
        _check_token_ids(self)

    @property
    def d_inner(self) -> int:
        return self.intermediate_size

    @staticmethod
    def auto_time_step_rank(hidden_size: int) -> int:
        return math.ceil(hidden_size / 16)


@dataclass(frozen=True)
class FalconConfig:
    """The Falcon transformer family (7B/40B/180B, Falcon2-11B, RW-1B/7B).

    Math-relevant fields mirror transformers' FalconConfig. Two are normalised the way transformers does:
    ``num_kv_heads=None`` becomes ``num_attention_heads``, and ``num_ln_in_parallel_attn=None`` becomes 2 with
    ``new_decoder_architecture``. ``kv_heads`` is the number of key/value heads the weights actually have
    (transformers ignores ``num_kv_heads`` for multi-query models). transformers' ``rope_parameters`` dict is
    ``rope_theta`` plus ``rope_scaling_type`` (None, "linear" or "dynamic") and ``rope_scaling_factor``.
    ``compute_dtype``, ``param_dtype``, ``attention_impl`` and ``attention_block_size`` are ours; "auto"
    attention runs "xla" while the keys fit in one block and "blockwise" beyond.
    """

    family: ClassVar[str] = "falcon"

    vocab_size: int = 65024
    hidden_size: int = 4544
    num_hidden_layers: int = 32
    num_attention_heads: int = 71
    num_kv_heads: int | None = None
    new_decoder_architecture: bool = False
    multi_query: bool = True
    parallel_attn: bool = True
    bias: bool = False
    alibi: bool = False
    num_ln_in_parallel_attn: int | None = None
    ffn_hidden_size: int | None = None
    layer_norm_epsilon: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_type: str | None = None
    rope_scaling_factor: float = 1.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 11
    eos_token_id: int | tuple[int, ...] | None = 11  # a tuple: several end-of-sequence tokens
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    # Ours: numerics and kernels.
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: str = "auto"
    attention_block_size: int = 1024
    # The fields above that were None and got their derived value (configs.loader.replace derives them anew).
    derived: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "derived", tuple(name for name in ("num_kv_heads", "num_ln_in_parallel_attn",
                                                                    "ffn_hidden_size")
                                                  if getattr(self, name) is None))
        _check_types(self)
        _positive_int(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "max_position_embeddings", "attention_block_size")
        heads = self.num_attention_heads
        _require(self.hidden_size % heads == 0, "num_attention_heads",
                 f"a divisor of hidden_size ({self.hidden_size})", heads)
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", heads)
        _positive_int(self, "num_kv_heads")
        if self.new_decoder_architecture:
            _require(heads % self.num_kv_heads == 0, "num_kv_heads",
                     f"a divisor of num_attention_heads ({heads})", self.num_kv_heads)
            _require(self.parallel_attn, "parallel_attn",
                     "true with new_decoder_architecture (transformers has no sequential variant of it)",
                     self.parallel_attn)
            if self.num_ln_in_parallel_attn is None:
                object.__setattr__(self, "num_ln_in_parallel_attn", 2)
        elif not self.multi_query:
            _require(self.num_kv_heads == heads, "num_kv_heads",
                     f"num_attention_heads ({heads}) for multi-head attention (multi_query false)",
                     self.num_kv_heads)
        _require(self.num_ln_in_parallel_attn in (None, 1, 2), "num_ln_in_parallel_attn", "None, 1 or 2",
                 self.num_ln_in_parallel_attn)
        _require(self.num_ln_in_parallel_attn != 2 or self.new_decoder_architecture, "num_ln_in_parallel_attn",
                 "None or 1 without new_decoder_architecture (only that layout has ln_attn and ln_mlp)",
                 self.num_ln_in_parallel_attn)
        if self.ffn_hidden_size is None:
            object.__setattr__(self, "ffn_hidden_size", 4 * self.hidden_size)
        _positive_int(self, "ffn_hidden_size")
        _positive_number(self, "layer_norm_epsilon", "rope_theta", "rope_scaling_factor", "initializer_range")
        _require(self.rope_scaling_type in ROPE_SCALING_TYPES, "rope_scaling_type",
                 f"one of {list(ROPE_SCALING_TYPES)}", self.rope_scaling_type)
        _require(not (self.alibi and self.rope_scaling_type), "rope_scaling_type",
                 "None with alibi (ALiBi models have no RoPE)", self.rope_scaling_type)
        _require(self.head_dim % 2 == 0 or self.alibi, "num_attention_heads",
                 f"a head count giving an even head_dim for RoPE (hidden_size {self.hidden_size})", heads)
        _choice(self, "compute_dtype", COMPUTE_DTYPES)
        _choice(self, "param_dtype", COMPUTE_DTYPES)
        _choice(self, "attention_impl", ATTENTION_IMPLS)
        _check_token_ids(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads in the weights: num_kv_heads (new arch), 1 (multi-query) or every head (MHA)."""
        if self.new_decoder_architecture:
            return self.num_kv_heads
        return 1 if self.multi_query else self.num_attention_heads

    @property
    def qkv_layout(self) -> str:
        """Row order of the fused query_key_value weight: "grouped" (new arch), "multi_query" or "interleaved"."""
        if self.new_decoder_architecture:
            return "grouped"
        return "multi_query" if self.multi_query else "interleaved"

    @property
    def block_layout(self) -> str:
        """"parallel" (one LN shared), "parallel_2ln" (ln_attn and ln_mlp) or "sequential"."""
        if self.new_decoder_architecture and self.num_ln_in_parallel_attn == 2:
            return "parallel_2ln"
        return "parallel" if self.parallel_attn else "sequential"


MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes it is split over (empty: replicated). The family sharding tables
# (ssm/sharding.py, transformer/sharding.py) name the logical axes of every parameter; "batch" is the
# batch dimension of the data. A config's ``mesh.rules`` overrides entries of this table.
DEFAULT_SHARDING_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "multi_query_heads": (),
    "d_inner": ("tensor",),
    "d_state": (),
    "xz": (),
    "conv": (),
    "dt_rank": (),
    "ssm_proj": (),
    "norm": (),
}


def merged_rules(rules: dict[str, Any] | None) -> dict[str, tuple[str, ...]]:
    """DEFAULT_SHARDING_RULES with ``rules`` (logical axis -> a mesh axis name, a list of them, or None for
    replicated) applied on top; every value checked."""
    merged = dict(DEFAULT_SHARDING_RULES)
    for logical, axes in (rules or {}).items():
        if logical not in DEFAULT_SHARDING_RULES:  # a misspelled axis would be a rule nothing reads
            close = difflib.get_close_matches(str(logical), list(DEFAULT_SHARDING_RULES), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"config field 'rules.{logical}': expected a logical axis, one of "
                              f"{list(DEFAULT_SHARDING_RULES)}, got {logical!r}{hint}")
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        _require(isinstance(axes, (list, tuple)) and all(a in MESH_AXES for a in axes)
                 and len(set(axes)) == len(axes), f"rules.{logical}",
                 f"null, one of {list(MESH_AXES)} or a list of distinct ones", axes)
        merged[logical] = tuple(axes)
    return merged


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, not a bool: a config built in Python may say weight_decay=0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class MeshConfig:
    """Named mesh axes; -1 means "all devices the other axes leave". ``rules`` maps logical axis names to
    mesh axes (a name, a list of names, or null/[] for replicated) over DEFAULT_SHARDING_RULES."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
        for key, value in sizes.items():
            _require(is_int(value) and (value > 0 or value == -1), key, "a positive integer or -1", value)
        rest = [key for key, value in sizes.items() if value == -1][1:]  # the axes after the first -1 one
        _require(not rest, rest[-1] if rest else "", "at most one mesh axis of size -1", sizes)
        _require(isinstance(self.rules, dict), "rules", "a mapping of logical axis -> mesh axes", self.rules)
        object.__setattr__(self, "rules", merged_rules(self.rules))


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup to ``learning_rate`` then cosine decay to ``learning_rate * end_lr_ratio``
    at the last step, after clipping gradients to global norm ``clip_norm`` (0: no clipping).
    ``decay_steps`` > 0 holds the learning rate constant after warmup and decays it only over the last
    ``decay_steps`` steps (warmup-stable-decay); 0: the decay spans every step after warmup."""

    learning_rate: float = 1e-3
    warmup_steps: int = 0
    end_lr_ratio: float = 0.1
    decay_steps: int = 0
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        _positive_number(self, "learning_rate", "eps")
        for name in ("end_lr_ratio", "weight_decay", "clip_norm"):
            value = getattr(self, name)
            _require(is_number(value) and 0 <= value < math.inf, name, "a finite non-negative number", value)
        for name in ("b1", "b2"):
            value = getattr(self, name)
            _require(is_number(value) and 0 <= value < 1, name, "a number in [0, 1)", value)
        for name in ("warmup_steps", "decay_steps"):
            value = getattr(self, name)
            _require(is_int(value) and value >= 0, name, "an integer >= 0", value)


@dataclass(frozen=True)
class DataConfig:
    """What the trainer reads. ``task`` names an entry of experiments.data.TASKS: a synthetic task generated
    from (seed, step); "bytes", a byte-level LM stream over the files matching ``text_glob`` under
    ``text_dir`` (empty: the directory of Python's own standard library); or "tokens", an LM stream over
    ``token_file``, a 1-D .npy of token ids (python -m experiments.tokenize_corpus writes one). ``num_items`` is
    the number of tokens selective_copying copies or of key-value pairs mqar stores. ``batch_size`` is global (all
    devices, all microbatches); each step runs ``grad_accum`` microbatches of batch_size / grad_accum.
    ``length_curriculum``: [[seq_len, steps], ...] stages of shorter sequences trained first, in order, before
    the rest of the run at ``seq_len`` (each stage's seq_len at most ``seq_len``); empty: seq_len throughout."""

    task: str = "induction"
    batch_size: int = 8
    seq_len: int = 64
    grad_accum: int = 1
    length_curriculum: tuple[tuple[int, ...], ...] = ()
    # Synthetic tasks: selective_copying copies num_items tokens; mqar stores num_items key-value pairs.
    num_items: int = 4
    text_dir: str = ""
    text_glob: str = "*.py"
    token_file: str = ""

    def __post_init__(self) -> None:
        _check_types(self)
        _positive_int(self, "batch_size", "seq_len", "grad_accum", "num_items")
        _require(self.batch_size % self.grad_accum == 0, "batch_size",
                 f"a multiple of grad_accum ({self.grad_accum})", self.batch_size)
        _require(isinstance(self.task, str) and self.task != "", "task", "a task name", self.task)
        _require(isinstance(self.length_curriculum, (list, tuple)), "length_curriculum",
                 "a list of [seq_len, steps] stages", self.length_curriculum)
        for i, stage in enumerate(self.length_curriculum):
            is_pair = isinstance(stage, (list, tuple)) and len(stage) == 2
            _require(is_pair and all(is_int(x) and x > 0 for x in stage), f"length_curriculum[{i}]",
                     "[seq_len, steps], two positive integers",
                     list(stage) if isinstance(stage, (list, tuple)) else stage)
            _require(stage[0] <= self.seq_len, f"length_curriculum[{i}]",
                     f"a seq_len <= data.seq_len ({self.seq_len})", list(stage))
        # a config built in Python may give lists (the loader gives tuples): frozen and hashable either way
        object.__setattr__(self, "length_curriculum", tuple(tuple(stage) for stage in self.length_curriculum))

    def positions_before(self, step: int) -> int:
        """The tokens a row has read before training step ``step``: the sum of seq_len_at over earlier steps."""
        total = 0
        for length, stage_steps in self.length_curriculum:
            taken = min(step, stage_steps)
            total, step = total + taken * length, step - taken
        return total + step * self.seq_len

    def seq_len_at(self, step: int) -> int:
        """The sequence length of training step ``step`` (0-based)."""
        for length, stage_steps in self.length_curriculum:
            if step < stage_steps:
                return length
            step -= stage_steps
        return self.seq_len


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process JAX. ``initialize: true`` calls jax.distributed.initialize with the three fields below;
    those left null are detected from the environment (TPU pods, Slurm, Open MPI)."""

    initialize: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        _require(self.num_processes is None or (is_int(self.num_processes) and self.num_processes > 0),
                 "num_processes", "null or a positive integer", self.num_processes)
        _require(self.process_id is None or (is_int(self.process_id) and self.process_id >= 0),
                 "process_id", "null or a non-negative integer", self.process_id)
        if self.num_processes is not None and self.process_id is not None:
            _require(self.process_id < self.num_processes, "process_id",
                     f"< num_processes ({self.num_processes})", self.process_id)


ModelConfig = FalconMambaConfig | FalconConfig

MODEL_CONFIGS: dict[str, type] = {"falcon_mamba": FalconMambaConfig, "falcon": FalconConfig}

REMAT_POLICIES = ("none", "full", "dots")


@dataclass(frozen=True)
class RunConfig:
    """What a command line runs: a model, a mesh and the run's own settings (training fields are read by
    experiments.train). ``checkpoint_every`` 0 saves only at the end (and on SIGTERM); ``remat`` is the
    rematerialisation policy of each layer: none, full (keep only each layer's input, recompute the layer in
    the backward pass) or dots (also keep the layer's matmul outputs)."""

    model: Any = field(default_factory=FalconMambaConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    seed: int = 0
    output_dir: str = "runs/default"
    steps: int = 100
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    remat: str = "none"
    # A local Hugging Face directory whose weights a new run starts from (fine-tuning); empty: random init.
    init_from: str = ""
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        _require(type(self.model) in MODEL_CONFIGS.values(), "model",
                 "a model config (" + " or ".join(f"{cls.__name__}, family {name!r}"
                                                  for name, cls in sorted(MODEL_CONFIGS.items())) + ")",
                 self.model)
        for name, cls in (("mesh", MeshConfig), ("optim", OptimConfig), ("data", DataConfig),
                          ("distributed", DistributedConfig)):  # a config built in Python: not a dict
            _require(isinstance(getattr(self, name), cls), name, f"a {cls.__name__}", getattr(self, name))
        # jax.random keys (x64 off) keep the seed's low 32 bits: 2**32 would be seed 0 again, 2**64 an OverflowError
        _require(is_int(self.seed) and 0 <= self.seed < 2**32, "seed", "an integer in [0, 2**32)", self.seed)
        _require(isinstance(self.output_dir, str) and self.output_dir.strip() != "", "output_dir",
                 "a non-empty path", self.output_dir)
        _require(isinstance(self.init_from, str), "init_from", "a Hugging Face directory's path, or empty",
                 self.init_from)
        _positive_int(self, "steps", "log_every", "keep_checkpoints")
        _require(is_int(self.checkpoint_every) and self.checkpoint_every >= 0, "checkpoint_every",
                 "an integer >= 0", self.checkpoint_every)
        _choice(self, "remat", REMAT_POLICIES)
        _require(self.optim.warmup_steps < self.steps, "optim.warmup_steps", f"< steps ({self.steps})",
                 self.optim.warmup_steps)
        _require(self.optim.decay_steps <= self.steps - self.optim.warmup_steps, "optim.decay_steps",
                 f"<= steps - optim.warmup_steps ({self.steps} - {self.optim.warmup_steps})", self.optim.decay_steps)
        curriculum_steps = sum(stage[1] for stage in self.data.length_curriculum)
        _require(curriculum_steps < self.steps, "data.length_curriculum",
                 f"stages totalling fewer than steps ({self.steps}) steps, so that the run reaches data.seq_len",
                 [list(stage) for stage in self.data.length_curriculum])


def fields_of(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]
