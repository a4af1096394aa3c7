"""The model interface both families implement, and the input checks every entry point shares.

A family's LM subclasses CausalLM and provides (traceable, no checks inside):

    run(input_ids, state, n_valid=None, remat=None) -> (hidden (batch, seq, hidden), new_state)
        state None: a plain forward. Otherwise continue from ``state``; only each row's first n_valid
        (batch,) tokens are real (right padding) and the rest leave the state as it was. ``remat``: a
        jax.checkpoint policy; each layer is then called through ``call_layer`` (rematerialised one by one).
    input_embedding -> its token embedding (an Embed), with ``lm_head`` None where the output projection is
        tied to it (logits, below, then attend through it)
    empty_state(batch_size, max_len=None) -> DecodeState of zeros (checks its arguments)
    state_specs(mesh) -> the PartitionSpecs of the state's leaves on ``mesh``, the way its parameters are split
    state_capacity(state) -> positions the state can hold (None: unbounded)

CausalLM builds on them logits(hidden) (fp32, (..., vocab)), init_state (empty_state, made split over the mesh the
parameters are split over) and the public, checked and jit-compiled API: __call__ (full logits), prefill (chunk by
chunk, carrying the state), step (one token) and log_likelihood (chunked, never seqlen x vocab logits).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from configs.schema import DEFAULT_SHARDING_RULES, merged_rules
from runtime.checks import check_positive_int, check_seed, shape_of
from runtime.partitioning import batch_axes, entry_axes, traced_under


class DecodeState(NamedTuple):
    """The recurrent state of either family: per-layer state (SSM: conv + SSM states; Falcon: the KV cache)
    and the number of tokens each row has consumed."""

    layers: Any
    lengths: jax.Array  # (batch,) int32


def _call(layer, *args):
    return layer(*args)


def call_layer(layer, remat, *args):
    """layer(*args); with a jax.checkpoint policy ``remat``, rematerialised on its own (nnx.remat): the backward
    pass keeps only what the policy saves of this layer and recomputes the rest when it reaches it, so the
    training peak holds one layer's intermediates plus every layer's input."""
    if remat is None:
        return layer(*args)
    return nnx.remat(_call, policy=remat)(layer, *args)


def check_token_ids(input_ids, vocab_size: int, name: str = "input_ids", ndim: int = 2) -> jax.Array:
    """Checks rank, integer dtype and the vocabulary range (jnp indexing would clamp silently)."""
    if isinstance(input_ids, (list, tuple)):
        input_ids = _rectangular(name, input_ids)
    if not hasattr(input_ids, "shape") or input_ids.ndim != ndim:
        layout = "(batch, seq)" if ndim == 2 else "(batch,)"
        raise ValueError(f"{name}: expected an integer array of shape {layout}, got shape {shape_of(input_ids)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise TypeError(f"{name}: expected an integer dtype, got {input_ids.dtype}")
    if any(s == 0 for s in input_ids.shape):
        raise ValueError(f"{name}: expected a non-empty array, got shape {tuple(input_ids.shape)}")
    if not isinstance(input_ids, jax.core.Tracer):
        values = np.asarray(input_ids)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{name}: token ids must be in [0, {vocab_size}) (vocab_size), got {bad}")
    return jnp.asarray(input_ids, jnp.int32)


def _rectangular(name: str, rows) -> np.ndarray:
    """np.asarray of a nested list or an array; a ragged list (rows of different lengths) named, not NumPy's
    message."""
    try:
        return np.asarray(rows)
    except ValueError:
        raise ValueError(f"{name}: expected rows of equal length (pad them and pass attention_mask), got lengths "
                         f"{[len(row) if isinstance(row, (list, tuple)) else 'scalar' for row in rows]}") from None


def traced_on_parameter_mesh(jitted):
    """``jitted`` (a jit-compiled function of a model and arrays) called under the mesh the model's parameters are
    split over and the model's sharding_rules (runtime.partitioning.traced_under), as the trainer traces its step:
    the scan's Pallas kernels then run inside shard_map, each device on its own rows and channels (traced without
    the mesh, a kernel is one custom call XLA runs whole on every device, its inputs gathered first), and the layers'
    constraints (runtime.partitioning.constrain) apply. The abstract mesh is part of jit's cache key and the rules
    are static in the model's graph, so a model on one device keeps its programs."""
    @functools.wraps(jitted)
    def call(model, *args, **kwargs):
        mesh = parameter_mesh(model)
        if mesh is None:
            return jitted(model, *args, **kwargs)
        with traced_under(mesh, dict(model.sharding_rules)):
            return jitted(model, *args, **kwargs)
    return call


@traced_on_parameter_mesh
@nnx.jit
def _jit_forward(model, input_ids):
    return model.forward(input_ids)


# The chunked loops donate the state they carry: XLA updates it in place (a KV cache is not copied at each chunk,
# and exists once, not as a chunk's input and its output). step does not: its state is the caller's.
@traced_on_parameter_mesh
@nnx.jit(donate_argnames=("state",))
def _jit_prefill_chunk(model, input_ids, state, n_valid, last_logits):
    """Runs one chunk; rows whose last real token is in it take its logits, the others keep last_logits."""
    hidden, state = model.run(input_ids, state, n_valid)
    index = jnp.maximum(n_valid - 1, 0)
    at_last = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
    logits = model.logits(at_last)
    return jnp.where((n_valid > 0)[:, None], logits, last_logits), state


def run_one_token(model, token_ids, state):
    """Traceable: the model run on one token per row, token_ids (batch,): (next logits (batch, vocab), state)."""
    hidden, state = model.run(token_ids[:, None], state)
    return model.logits(hidden[:, 0]), state


_jit_step = traced_on_parameter_mesh(nnx.jit(run_one_token))


@traced_on_parameter_mesh
@nnx.jit(donate_argnames=("state",))
def _jit_chunk_log_likelihood(model, input_ids, targets, state):
    """log p(targets[:, t] | input_ids[:, :t+1]) for the chunk; targets may be one shorter than the chunk."""
    hidden, state = model.run(input_ids, state, None)
    logp = jax.nn.log_softmax(model.logits(hidden[:, :targets.shape[1]]), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], state


def normalize_padding(input_ids, attention_mask=None, lengths=None):
    """Returns (right-padded ids, lengths (batch,)). A left-padded row is shifted so its tokens start at 0."""
    batch, seq = input_ids.shape
    if attention_mask is not None and lengths is not None:
        raise ValueError("attention_mask, lengths: expected at most one of them, got both")
    if lengths is not None:
        lengths = np.asarray(lengths)
        if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"lengths: expected integers of shape ({batch},), got {lengths.dtype} {lengths.shape}")
        if lengths.min() < 1 or lengths.max() > seq:
            raise ValueError(f"lengths: expected values in [1, {seq}] (the sequence length), got {lengths.tolist()}")
        return input_ids, jnp.asarray(lengths, jnp.int32)
    if attention_mask is None:
        return input_ids, jnp.full((batch,), seq, jnp.int32)
    mask = _rectangular("attention_mask", attention_mask)
    if mask.shape != (batch, seq):
        raise ValueError(f"attention_mask: expected shape {(batch, seq)} like input_ids, got {mask.shape}")
    if not ((mask == 0) | (mask == 1)).all():  # an additive mask (0 / -inf) would read as left padding
        bad = mask[~((mask == 0) | (mask == 1))].flat[0]
        raise ValueError(f"attention_mask: expected 1 for a real token and 0 for padding (bool or 0/1), got {bad}")
    mask = mask.astype(bool)
    counts = mask.sum(axis=1)
    first = mask.argmax(axis=1)
    contiguous = (np.arange(seq)[None] >= first[:, None]) & (np.arange(seq)[None] < (first + counts)[:, None])
    if (counts == 0).any() or (contiguous != mask).any():
        bad = int(np.flatnonzero((counts == 0) | (contiguous != mask).any(axis=1))[0])
        raise ValueError(f"attention_mask: expected each row to hold one contiguous run of real tokens (left or "
                         f"right padding), row {bad} is {mask[bad].astype(int).tolist()}")
    gather = np.minimum(first[:, None] + np.arange(seq)[None], seq - 1)
    shifted = jnp.take_along_axis(input_ids, jnp.asarray(gather), axis=1)
    return shifted, jnp.asarray(counts, jnp.int32)


_STATE_LAYOUTS: dict = {}


def _state_layout(model, batch: int, capacity: int | None):
    """The abstract DecodeState of model.init_state(batch, capacity), remembered per config (tracing init_state
    takes ~0.1 s for 80 layers: too long to repeat at every step)."""
    key = (type(model), model.config, batch, capacity)
    if key not in _STATE_LAYOUTS:
        if len(_STATE_LAYOUTS) >= 64:
            _STATE_LAYOUTS.clear()
        _STATE_LAYOUTS[key] = jax.eval_shape(lambda: model.empty_state(batch, capacity))
    return _STATE_LAYOUTS[key]


def parameter_sharding(model):
    """The Sharding of ``model``'s parameters (its input embedding's: one lookup; walking nnx.state of an 80-layer
    model took 38 ms), or None where they are abstract or traced (the model an argument of nnx.jit, nnx.grad or
    nnx.eval_shape: a tracer has no sharding)."""
    table = model.input_embedding.embedding.get_value()  # (an abstract model's is a ShapeDtypeStruct)
    return table.sharding if isinstance(table, jax.Array) and not isinstance(table, jax.core.Tracer) else None


def _mesh_of(sharding) -> Mesh | None:
    """The mesh of a parameter ``sharding`` where it has more than one device, else None."""
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def parameter_mesh(model) -> Mesh | None:
    """The mesh ``model``'s parameters are split over where it has more than one device, else None: one device, or
    abstract or traced parameters."""
    return _mesh_of(parameter_sharding(model))


def _device_order(sharding) -> tuple:
    """The devices of ``sharding`` in the order jit compares them: its mesh's (arrays on the same devices in another
    order, a state made by the model loaded on another mesh of them, are 'incompatible devices' to jit); a
    sharding without a mesh (one device's) by id."""
    if isinstance(sharding, NamedSharding):
        return tuple(sharding.mesh.devices.flat)
    return tuple(sorted(sharding.device_set, key=lambda device: device.id))


def spec_of(array, dim: int):
    """The mesh axes (a PartitionSpec entry) that split dimension ``dim`` of a parameter: what a state dimension
    of the same feature is split by."""
    spec = array.sharding.spec if isinstance(getattr(array, "sharding", None), NamedSharding) else ()
    return spec[dim] if dim < len(spec) else None


def init_rngs(config, config_cls: type, rngs: nnx.Rngs | None, seed: Any) -> nnx.Rngs:
    """A family's constructor arguments checked (a config of another family failed on a missing attribute deep
    inside the constructor): the Rngs to draw the parameters from, nnx.Rngs(seed) unless ``rngs`` is given."""
    if not isinstance(config, config_cls):
        raise TypeError(f"config: expected a {config_cls.__name__}, got {type(config).__name__}")
    if rngs is not None:
        return rngs
    check_seed("seed", seed)
    return nnx.Rngs(int(seed))  # nnx.Rngs refuses a NumPy integer


class CausalLM(nnx.Module):
    """Base of both families' LMs. Subclasses set ``self.config`` and ``self.lm_head`` (None where the head is tied
    to the input embedding) and define run, input_embedding, empty_state, state_specs and state_capacity."""

    # the logical -> mesh axis rules the model was loaded with (from_pretrained(rules=...); load_trained_model: the
    # run's mesh.rules; else DEFAULT_SHARDING_RULES) as sorted (logical axis, mesh axes) pairs: static in nnx's graph,
    # so part of every jit's cache key. With the parameters on a mesh, a batch's rows (inputs and state) are split
    # over the 'batch' axes where they divide (batch_axes), and each call is traced under the mesh and these rules
    # (traced_on_parameter_mesh).
    sharding_rules: tuple[tuple[str, tuple[str, ...]], ...] = tuple(sorted(DEFAULT_SHARDING_RULES.items()))

    def set_sharding_rules(self, rules: Mapping[str, Any] | None) -> None:
        """sharding_rules: DEFAULT_SHARDING_RULES with ``rules`` (mesh.rules' form) applied, checked."""
        self.sharding_rules = tuple(sorted(merged_rules(rules).items()))

    @property
    def batch_rule(self) -> tuple[str, ...]:
        """The mesh axes of sharding_rules' 'batch' entry."""
        return dict(self.sharding_rules)["batch"]

    def run(self, input_ids, state):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def input_embedding(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def logits(self, hidden):
        """fp32 logits from final hidden states: the lm_head, or the input embedding where it is tied."""
        if self.lm_head is None:
            return self.input_embedding.attend(hidden)
        return self.lm_head(hidden, out_dtype=jnp.float32)

    def empty_state(self, batch_size: int, max_len: int | None = None):  # pragma: no cover - abstract
        raise NotImplementedError

    def state_specs(self, mesh):  # pragma: no cover - abstract
        raise NotImplementedError

    def init_state(self, batch_size: int, max_len: int | None = None):
        """An empty DecodeState for ``batch_size`` rows (a KV cache of ``max_len`` positions; Falcon Mamba's state
        has no length). Where the parameters are split over a mesh of several devices (from_pretrained(mesh=...),
        --mesh), each array is made split the same way (state_specs: kv heads or d_inner like the attention or
        mixer weights; the rows like the inputs', state_shardings), never whole on one device first."""
        mesh = parameter_mesh(self)
        if mesh is None:
            return self.empty_state(batch_size, max_len)
        leaves, tree = jax.tree.flatten(_state_layout(self, batch_size, max_len))  # checks the arguments
        shardings = self.state_shardings(mesh, batch_size)
        return tree.unflatten([jnp.zeros(leaf.shape, leaf.dtype, device=sharding)
                               for leaf, sharding in zip(leaves, shardings, strict=True)])

    def state_shardings(self, mesh, batch_size: int) -> list[NamedSharding]:
        """The NamedShardings of the state's leaves (in jax.tree.leaves order) on ``mesh``: the family's
        state_specs, with the rows (every leaf's first dimension) split like the inputs' (batch_axes) over the axes
        its other dimensions do not use (rules splitting d_inner or kv heads over fsdp, say: the axis then splits
        those, a spec naming it twice is refused)."""
        rows = batch_axes(mesh, batch_size, self.batch_rule)
        specs = jax.tree.leaves(self.state_specs(mesh), is_leaf=lambda x: isinstance(x, PartitionSpec))
        shardings = []
        for spec in specs:
            used = {axis for entry in spec[1:] for axis in entry_axes(entry)}
            free = tuple(axis for axis in rows if axis not in used)  # a divisor's divisor: they still divide
            shardings.append(NamedSharding(mesh, PartitionSpec(free or None, *spec[1:])))
        return shardings

    def _rows_split(self, array: jax.Array) -> jax.Array:
        """``array`` (batch, ...) on the parameters' mesh with its rows split over its batch axes (batch_axes), so
        a model loaded on several devices runs its batch data-parallel (whole on every device where the axes do
        not divide its rows). Without a mesh: as it is, unless it is a jax.Array on other devices (logits of the
        model loaded on a mesh, say), then moved onto the parameters' device."""
        sharding = parameter_sharding(self)
        mesh = _mesh_of(sharding)
        if mesh is not None:
            rows = batch_axes(mesh, array.shape[0], self.batch_rule)
            return jax.device_put(array, NamedSharding(mesh, PartitionSpec(rows or None)))
        placed = isinstance(array, jax.Array) and not isinstance(array, jax.core.Tracer)
        if sharding is not None and placed and _device_order(array.sharding) != _device_order(sharding):
            return jax.device_put(array, SingleDeviceSharding(_device_order(sharding)[0]))  # another model's logits
        return array

    def _on_model_devices(self, state):
        """``state`` (checked by _check_state) where this model computes: as it is where every array already is on
        the parameters' devices (init_state's, prefill's and step's states); moved there otherwise (a state made by
        the same model loaded on one device, passed to it loaded on a mesh, or the other way round), split as
        init_state splits it. jit refused such a state ("incompatible devices")."""
        parameters = parameter_sharding(self)
        if parameters is None:  # traced parameters: placement is the tracing caller's
            return state
        devices = _device_order(parameters)  # jit compares the devices in this order
        leaves, tree = jax.tree.flatten(state)
        shardings = {getattr(leaf, "sharding", None) for leaf in leaves}  # a few distinct ones (NumPy's: None)
        if all(sharding is not None and _device_order(sharding) == devices for sharding in shardings):
            return state
        mesh = _mesh_of(parameters)
        shardings = (self.state_shardings(mesh, len(state.lengths)) if mesh is not None
                     else [SingleDeviceSharding(devices[0])] * len(leaves))
        # (the moved arrays may share the caller's buffers: device_put keeps device 0's; copy before donating)
        return tree.unflatten([jax.device_put(leaf, sharding) for leaf, sharding in zip(leaves, shardings)])

    def forward(self, input_ids: jax.Array, remat=None) -> jax.Array:
        """Unchecked, traceable full-sequence logits (for use inside jit, e.g. a training loss); ``remat``: a
        jax.checkpoint policy applied to each layer (see call_layer)."""
        hidden, _ = self.run(input_ids, None, remat=remat)
        return self.logits(hidden)

    def __call__(self, input_ids) -> jax.Array:
        """int (batch, seq) -> float32 logits (batch, seq, vocab); checked and jit-compiled."""
        return _jit_forward(self, self._rows_split(check_token_ids(input_ids, self.config.vocab_size)))

    def _chunks(self, length: int, chunk_size):
        check_positive_int("chunk_size", chunk_size, allow_none=True)
        size = length if chunk_size is None else int(chunk_size)
        return [(start, min(start + size, length)) for start in range(0, length, size)]

    def state_capacity(self, state) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_state(self, state, batch: int) -> None:
        """``state`` is what this model's init_state(batch, capacity) makes: each array's shape and dtype (a state
        of another model, with fewer layers say, would otherwise run silently on part of the layers)."""
        if not isinstance(state, DecodeState) or getattr(state.lengths, "shape", None) != (batch,):
            lengths = shape_of(state.lengths) if isinstance(state, DecodeState) else None
            got = (type(state).__name__ if lengths is None else f"batch {lengths[0]}" if len(lengths) == 1 else
                   f"lengths of shape {lengths}")
            raise ValueError(f"state: expected a DecodeState for batch {batch} from init_state, got {got}")
        layers = self.config.num_hidden_layers
        if not isinstance(state.layers, (list, tuple)) or len(state.layers) != layers:
            got = len(state.layers) if isinstance(state.layers, (list, tuple)) else type(state.layers).__name__
            raise ValueError(f"state: expected the {layers} layers of this model's init_state, got {got}")
        expected = _state_layout(self, batch, self.state_capacity(state))
        got_leaves, got_tree = jax.tree_util.tree_flatten_with_path(state)
        want_leaves, want_tree = jax.tree_util.tree_flatten_with_path(expected)
        if got_tree != want_tree:
            raise ValueError(f"state: expected layers of this model's init_state, "
                             f"{jax.tree.structure(expected.layers[0])}, got {jax.tree.structure(state.layers[0])}")
        for (path, got), (_, want) in zip(got_leaves, want_leaves):
            if (shape_of(got), getattr(got, "dtype", None)) != (want.shape, want.dtype):
                raise ValueError(f"state{jax.tree_util.keystr(path)}: expected shape {want.shape} {want.dtype} (this "
                                 f"model's init_state), got {shape_of(got)} {getattr(got, 'dtype', None)}")

    def _check_fits(self, state, new_tokens: int, name: str = "input_ids", note: str = "") -> None:
        """A KV cache's lengths are token counts (>= 0: they are the positions) with room for ``new_tokens`` more;
        a state without capacity (Falcon Mamba's, whose lengths only count) is not read back from the device."""
        capacity = self.state_capacity(state)
        if capacity is not None:
            lengths = np.asarray(state.lengths)
            if lengths.min() < 0:
                raise ValueError(f"state.lengths: expected token counts (integers >= 0), got {lengths.tolist()}")
            used = int(lengths.max())
            if used + new_tokens > capacity:
                raise ValueError(f"{name}: {new_tokens} new tokens after {used} cached ones need {used + new_tokens}"
                                 f" positions{note}, but the KV cache holds max_len={capacity}; init_state with a "
                                 f"larger max_len")

    def prefill(self, input_ids, state, chunk_size=None, attention_mask=None, lengths=None):
        """Feeds prompts chunk by chunk, carrying ``state``; returns (logits at each row's last real token
        (batch, vocab), state). Any chunk size gives the logits and state of one full pass.

        Prompts of different lengths: ``attention_mask`` (batch, seq) with 1 on real tokens, contiguous per
        row (left or right padding), or ``lengths`` (batch,) for right padding. Every row gets the result it
        would get alone.

        ``state`` stays valid: the chunks update a copy of it in place (one state's memory, not two at each chunk).
        """
        return self._prefill(input_ids, state, chunk_size, attention_mask, lengths, copy_state=True)

    def _prefill(self, input_ids, state, chunk_size, attention_mask, lengths, copy_state: bool):
        """prefill; ``copy_state`` False where the caller hands the state over (generation's own init_state): its
        buffers are then donated to the first chunk and deleted."""
        input_ids = check_token_ids(input_ids, self.config.vocab_size)
        batch, seq = input_ids.shape
        input_ids, row_lengths = normalize_padding(input_ids, attention_mask, lengths)
        input_ids = self._rows_split(input_ids)
        self._check_state(state, batch)
        self._check_fits(state, seq)
        state = self._on_model_devices(state)
        if copy_state:
            state = jax.tree.map(jnp.copy, state)
        logits = jnp.zeros((batch, self.config.vocab_size), jnp.float32)
        for start, end in self._chunks(seq, chunk_size):
            n_valid = jnp.clip(row_lengths - start, 0, end - start).astype(jnp.int32)
            logits, state = _jit_prefill_chunk(self, input_ids[:, start:end], state, n_valid, logits)
        return logits, state

    def step(self, token_ids, state):
        """One decode step: token_ids (batch,) -> (logits (batch, vocab), state); each row continues at its own
        length."""
        token_ids = check_token_ids(token_ids, self.config.vocab_size, name="token_ids", ndim=1)
        self._check_state(state, token_ids.shape[0])
        self._check_fits(state, 1, name="token_ids")
        return _jit_step(self, self._rows_split(token_ids), self._on_model_devices(state))

    def log_likelihood(self, input_ids, chunk_size=None):
        """log p(x_{t+1} | x_{<=t}) for t in [0, seq-1): (batch, seq-1) fp32, computed chunk by chunk so that
        no (seq, vocab) logits exist at once."""
        input_ids = self._rows_split(check_token_ids(input_ids, self.config.vocab_size))
        batch, length = input_ids.shape
        if length < 2:
            raise ValueError(f"input_ids: expected at least 2 tokens per row for a likelihood, got {length}")
        # a last one-token chunk has no target; one chunk left is a plain forward over all the tokens, as
        # chunk_size=None, with no state (so no KV cache, which dynamic RoPE scaling cannot have)
        chunks = [(start, end) for start, end in self._chunks(length, chunk_size) if start + 1 < length]
        if len(chunks) == 1:
            chunks = [(0, length)]
        state = None if len(chunks) == 1 else self.init_state(batch, max_len=length)
        pieces = []
        for start, end in chunks:
            targets = input_ids[:, start + 1:end + 1]
            logp, state = _jit_chunk_log_likelihood(self, input_ids[:, start:end], targets, state)
            pieces.append(logp)
        return jnp.concatenate(pieces, axis=1)
