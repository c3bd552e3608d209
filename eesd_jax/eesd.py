"""The EESD draft/verify loop: one jitted lax.while_loop over rounds.

One round, for a row whose newest accepted token x sits at position p (steps 1 and 2 are
chain.py's; with EESDConfig.tree a draft tree's are tree.py's):
  1. Draft. Block token 0 is x. For i = 0, 1, ...: run block token i through
     layers [0, N) (writing the shared cache) and keep its layer-N hidden state;
     then the exit drafts d_{i+1} from it, and the controller decides whether to
     keep d_{i+1} (it becomes block token i + 1) or stop. At most max_draft.
  2. Verify. Layers [N, L) run over the k + 1 block positions p .. p + k from the
     stored layer-N hidden states: the first N layers are never recomputed. The
     block is padded to the smallest bucket size >= k + 1 (lax.switch), so the
     cost follows the drafted length, not max_draft.
  3. Accept. Greedy: longest prefix matching the target's argmax, then the
     target's token. Sampling: speculative rejection sampling (sampling.py).
  4. Update. The kept tokens are appended (EOS / budget cut them per row); both
     caches roll back by setting their lengths: no copies. An exit with a context
     layer c (exits.ExitConfig.context_layer) gets its cache slots of the block
     rewritten from the block's layer-c states, which verification computed: the
     next round drafts over top-layer context at verified positions.
Rows are independent: positions, acceptance, caches and controller posteriors
are per row; a finished row rides along unchanged.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp

from eesd_jax import chain, control, exits, model, sampling, sharding, tree
from eesd_jax.decoding import append_tokens, finish_block, start_state
from eesd_jax.kv_cache import KVCache, init_cache
from eesd_jax.model import ModelConfig, Params
from eesd_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class EESDConfig:
    exit_layer: int  # N.
    max_draft: int = 8  # J: draft tokens per round at most.
    controller: control.ControllerConfig = control.ControllerConfig()
    buckets: tuple[int, ...] = ()  # Verify block sizes; () = powers of two up to J + 1.
    context_layer: int = 0  # The exit's exits.ExitConfig.context_layer (0: none).
    fuse_layers: tuple[int, ...] = ()  # The exit's exits.ExitConfig.fuse_layers (): none).
    # Ablation only (experiments/ablate.py --study components): verification runs the block's
    # tokens through layers [0, N) again, as verifying with the full model (a separate draft
    # model's way) would, instead of reusing the layer-N states drafting stored. Same output.
    recompute_lower: bool = False
    # Record every round's draft features and verification outcome in EESDState.trace (for
    # fitting the gate policy and acceptance by draft position: outcomes.py). Same output.
    trace: bool = False
    # Draft trees (tree.py): the node budget per round (0: a chain, the default) and the nodes
    # per depth, W (each expanded node offers its top W children); depth = tree // W. The
    # controller and max_draft do not apply.
    tree: int = 0
    tree_width: int = 4
    # > 0: the depth is chosen per round (tree.draft): depth d + 1 is grown while the exit's
    # expected accepted drafts from it, calibrated by the row's record (EESDState.tree_calib),
    # reach tree_stop for some row; a good value is a depth's cost in AR steps (costs.tree_round_ms).
    # 0: every round grows all tree // tree_width depths.
    tree_stop: float = 0.0
    # > 0: the width is chosen per round (tree.choose_width): only the first w <= tree_width nodes
    # of each depth are kept (verified, accepted, expanded), w grown while the next rank's expected
    # accepted drafts, from a posterior over acceptance by rank (EESDState.tree_ranks), reach
    # tree_width_stop; a good value is a rank's verification cost in AR steps (costs.width_cost).
    # 0: all tree_width nodes every round.
    tree_width_stop: float = 0.0

    def validate(self, cfg: ModelConfig) -> None:
        exits.ExitConfig(self.exit_layer, context_layer=self.context_layer, fuse_layers=self.fuse_layers).validate(cfg)
        if self.max_draft < 1:
            raise ValueError(f"max_draft must be >= 1, got {self.max_draft}")
        if self.tree < 0 or self.tree_width < 1:
            raise ValueError(f"tree must be >= 0 and tree_width >= 1, got {self.tree} and {self.tree_width}")
        if self.tree and self.tree % self.tree_width:
            raise ValueError(f"tree (node budget {self.tree}) must be a multiple of tree_width ({self.tree_width})")
        if self.tree_stop < 0 or (self.tree_stop and not self.tree):
            raise ValueError(f"tree_stop must be >= 0 and needs a tree (tree > 0), got {self.tree_stop}")
        if self.tree_width_stop < 0 or (self.tree_width_stop and not self.tree):
            raise ValueError(f"tree_width_stop must be >= 0 and needs a tree (tree > 0), got {self.tree_width_stop}")
        if self.tree and (self.trace or self.recompute_lower):
            raise ValueError("draft trees support neither trace nor recompute_lower")
        if self.buckets and (sorted(self.buckets) != list(self.buckets) or self.buckets[-1] != self.max_draft + 1):
            raise ValueError(f"buckets must be increasing and end at max_draft + 1, got {self.buckets}")

    def state_layers(self, n_layers: int) -> tuple[int, ...]:
        """The layers after which split_params cuts, ending with L: N, a context layer, fuse layers."""
        cuts = sorted({self.context_layer, *self.fuse_layers} - {0, self.exit_layer, n_layers})
        return (self.exit_layer, *cuts, n_layers)

    @property
    def block_len(self) -> int:
        """Cache slots a round writes past the accepted length at most: the block or the tree."""
        return (self.tree or self.max_draft) + 1

    @property
    def tree_sizes(self) -> tuple[int, ...]:
        """Tree verification sizes (kept nodes + root): 1 + d w for every depth d with tree_stop (else
        the whole tree's), every width w with tree_width_stop (else tree_width)."""
        R, W = self.tree // self.tree_width, self.tree_width
        depths = range(1, R + 1) if self.tree_stop else (R,)
        widths = range(1, W + 1) if self.tree_width_stop else (W,)
        return tuple(sorted({1 + d * w for d in depths for w in widths}))

    @property
    def block_sizes(self) -> tuple[int, ...]:
        if self.buckets:
            return self.buckets
        sizes = [1]
        while sizes[-1] * 2 < self.max_draft + 1:
            sizes.append(sizes[-1] * 2)
        return (*sizes, self.max_draft + 1)


def config_for_exit(
    exit_cfg: exits.ExitConfig,
    exit_path,
    max_draft: int,
    controller: str,
    tree: int = 0,
    tree_stop: float = 0.0,
    tree_width_stop: float = 0.0,
    tree_width: int = 4,
) -> EESDConfig:
    """EESD with a loaded exit: its N and context layer, J, and the `controller` spec
    (control.from_spec) completed with what was fitted for that exit (control.for_exit); `tree`
    nodes per round (0: a chain), tree_width per depth, the depth chosen per round with tree_stop > 0,
    the width with tree_width_stop > 0."""
    ctrl = control.for_exit(control.from_spec(controller), exit_path)
    return EESDConfig(
        exit_cfg.layer,
        max_draft,
        ctrl,
        context_layer=exit_cfg.context_layer,
        fuse_layers=exit_cfg.fuse_layers,
        tree=tree,
        tree_width=tree_width,
        tree_stop=tree_stop,
        tree_width_stop=tree_width_stop,
    )


@flax.struct.dataclass
class RoundTrace:
    """Every round's drafts and their verification (EESDConfig.trace); slot [b, r] is row b's round r."""

    features: jax.Array  # [B, R, J, len(chain.TRACED)] float32: each drafted token's features, valid below
    # n_draft + 1 (the last one drafted but not kept when the policy stopped before J).
    n_draft: jax.Array  # [B, R] drafts kept, and so verified.
    n_accepted: jax.Array  # [B, R] of those, the leading ones the LLM accepted.


@flax.struct.dataclass
class EESDState:
    """Loop state of EESD decoding; every array field is per row unless noted."""

    tokens: jax.Array  # [B, M] generated ids, PAD past n_new.
    n_new: jax.Array  # [B] tokens generated so far.
    max_new: jax.Array  # [B] per-row budget.
    last: jax.Array  # [B] newest accepted token, not yet fed through the model.
    done: jax.Array  # [B] bool: hit EOS or budget; the row no longer changes.
    cache: KVCache  # The LLM's cache, all L layers; lengths = positions processed and accepted.
    exit_cache: KVCache  # The exit block's own one-layer cache; same lengths.
    ctrl: control.ControllerState  # Draft-length controller posterior.
    key: jax.Array  # PRNG key (drafting, controller, acceptance).
    rounds: jax.Array  # [B] draft/verify rounds run while the row was live.
    drafted: jax.Array  # [B] draft tokens proposed.
    accepted: jax.Array  # [B] draft tokens accepted (bonus/correction tokens not counted).
    steps: jax.Array  # [] int32 rounds run by the loop (for chunked streaming).
    trace: RoundTrace | None = None  # With EESDConfig.trace, R = max_new rounds at most; else None.
    # [B, F, D] the LLM's states after the fuse layers at the position before `last` (verified),
    # what a fused exit's first draft of the next round reads; None without fuse layers.
    fuse_prev: jax.Array | None = None
    # [B, 2] float32 with an adaptive tree (EESDConfig.tree_stop), else None: per row, the draft
    # tokens accepted and the exit's predicted accepted drafts (tree.draft) summed over its rounds;
    # their posterior ratio (tree.calibration) scales the exit's probabilities in the depth stop.
    tree_calib: jax.Array | None = None
    # [B, W, 2] float32 with an adaptive width (EESDConfig.tree_width_stop), else None: per row and
    # rank (a node's place in its depth), the times the accepted child had that rank and the times
    # that rank was kept and passed over (tree.rank_counts), summed over its rounds; the posterior
    # over acceptance by rank that picks each round's width (tree.choose_width).
    tree_ranks: jax.Array | None = None


def split_params(
    params: Params, exit_layer: int, context_layer: int = 0, fuse_layers: tuple[int, ...] = ()
) -> tuple[Params, ...]:
    """Layer ranges [0, N), [N, L), cut also at a context layer c and at fuse layers (EESDConfig.state_layers).

    E.g. c: ([0, N), [N, c), [c, L)). Made once outside jit (see model.run_layers); the engine
    reads hidden states after each range.
    """
    ecfg = EESDConfig(exit_layer, context_layer=context_layer, fuse_layers=tuple(fuse_layers))
    cuts = ecfg.state_layers(model.num_layers(params["layers"]))
    segments, rest = [], params["layers"]
    for a, b in zip((0, *cuts[:-2]), cuts[:-1]):
        seg, rest = model.split_layers(rest, b - a)
        segments.append(seg)
    return (*segments, rest)


def _at(cfg: ModelConfig, ecfg: EESDConfig, states: tuple[jax.Array, ...], layers) -> jax.Array:
    """The states [..., len(layers), D] after `layers`, from `states` (one per EESDConfig.state_layers)."""
    return jnp.stack([states[ecfg.state_layers(cfg.n_layers).index(j)] for j in layers], -2)


@functools.partial(
    jax.jit, static_argnames=("cfg", "ecfg", "sampling_cfg", "eos_ids", "max_new"), donate_argnames=("cache",)
)
def eesd_init(
    cfg, ecfg, params, exit_params, cache, hiddens, first_logits_bv, max_new_b, key, sampling_cfg, eos_ids, max_new
) -> EESDState:
    """State after prefill: fill the exit's cache over the prompt, choose token 1.

    hiddens: the prompt's [B, P, D] states after each of ecfg.state_layers (N, a context layer,
    fuse layers, L), from decoding.prefill with split_params' segments.
    """
    B, P, _ = hiddens[0].shape
    exit_cache = init_cache(cfg, B, cache.max_len, layers=1)
    exit_cache = sharding.constrain_cache(exit_cache)  # Same layout as the LLM's cache under a mesh.
    positions = jnp.broadcast_to(jnp.arange(P), (B, P))
    fuse_prev, exit_in = None, hiddens[0]
    if ecfg.fuse_layers:  # Each prompt position reads its predecessor's states (none before position 0).
        states_bpfd = _at(cfg, ecfg, hiddens, ecfg.fuse_layers)
        feats = exits.fuse_features(cfg, exit_params, states_bpfd)
        exit_in = exits.fused_input(
            hiddens[0], exit_params, exits.previous_features(feats, jnp.zeros_like(feats[:, 0]))
        )
        fuse_prev = jnp.take_along_axis(states_bpfd, (cache.lengths - 1)[:, None, None, None], axis=1)[:, 0]
    if ecfg.context_layer:  # The prompt is verified: its context comes from the context layer.
        exit_cache = exits.write_context(
            cfg, exit_params, exit_cache, _at(cfg, ecfg, hiddens, [ecfg.context_layer])[..., 0, :], positions
        )
    else:
        _, exit_cache = exits.exit_write(cfg, exit_params, exit_in, positions, exit_cache)  # Keys/values only.
    tokens, n_new, last, done, key = start_state(first_logits_bv, max_new_b, key, max_new, sampling_cfg, eos_ids)
    zeros = jnp.zeros((B,), jnp.int32)
    return EESDState(
        tokens=tokens,
        n_new=n_new,
        max_new=max_new_b,
        last=last,
        done=done,
        cache=cache,
        exit_cache=exit_cache.replace(lengths=cache.lengths),
        ctrl=control.init(ecfg.controller, B),
        key=key,
        rounds=zeros,
        drafted=zeros,
        accepted=zeros,
        steps=jnp.int32(0),
        trace=RoundTrace(
            features=jnp.zeros((B, max_new, ecfg.max_draft, len(chain.TRACED)), jnp.float32),
            n_draft=jnp.zeros((B, max_new), jnp.int32),
            n_accepted=jnp.zeros((B, max_new), jnp.int32),
        )
        if ecfg.trace
        else None,
        fuse_prev=fuse_prev,
        tree_calib=jnp.zeros((B, 2), jnp.float32) if ecfg.tree_stop else None,
        tree_ranks=jnp.zeros((B, ecfg.tree_width, 2), jnp.float32) if ecfg.tree_width_stop else None,
    )


def _record(t: RoundTrace, round_b, live_b, d: chain.Draft, n_acc_b) -> RoundTrace:
    """t with this round written at each live row's round index (finished rows write nothing)."""
    rows, at = jnp.arange(round_b.shape[0]), jnp.where(live_b, round_b, t.n_draft.shape[1])
    put = lambda a, v: a.at[rows, at].set(v, mode="drop")  # noqa: E731  (out of range: dropped)
    return RoundTrace(put(t.features, d.features), put(t.n_draft, d.n_draft), put(t.n_accepted, n_acc_b))


@functools.partial(jax.jit, static_argnames=("cfg", "ecfg", "sampling_cfg", "eos_ids"), donate_argnames=("state",))
def eesd_decode(
    cfg: ModelConfig,
    ecfg: EESDConfig,
    params: Params,
    segments: tuple[Params, ...],
    exit_params: Params,
    state: EESDState,
    sampling_cfg: SamplingConfig,
    eos_ids: tuple[int, ...],
    max_steps: jax.Array,
) -> EESDState:
    """Run draft/verify rounds until every row is done or max_steps rounds ran.

    segments = split_params(params, ecfg.exit_layer, ecfg.context_layer, ecfg.fuse_layers).
    """
    if len(segments) != len(ecfg.state_layers(cfg.n_layers)):
        raise ValueError(f"segments must be split_params' for this EESDConfig: {len(segments)} segments")
    J, R = ecfg.max_draft, ecfg.tree // ecfg.tree_width
    lower = segments[0]

    def round_(s: EESDState) -> EESDState:
        pos0, live = s.cache.lengths, ~s.done
        d = chain.draft(cfg, ecfg, sampling_cfg, params, lower, exit_params, s)
        logits, cache, uppers = chain.verify(cfg, ecfg, params, segments, d, s.last, pos0)
        states = (d.hidden, *uppers)  # The block's states after each of ecfg.state_layers.
        block_positions = pos0[:, None] + jnp.arange(J + 1)[None]
        exit_cache, fuse_bjfd = _rewrite_verified(
            cfg, ecfg, exit_params, d.exit_cache, states, s.fuse_prev, block_positions
        )
        key, k_acc = jax.random.split(d.key)
        if sampling_cfg.greedy:
            n_acc, nxt = sampling.accept_greedy(d.tokens, d.n_draft, logits)
        else:
            n_acc, nxt = sampling.accept_sampled(k_acc, d.tokens, d.n_draft, d.logp, logits, sampling_cfg)
        idx = jnp.arange(J + 1)[None]
        drafts = jnp.pad(d.tokens, ((0, 0), (0, 1)))
        new_bj = jnp.where(idx < n_acc[:, None], drafts, nxt[:, None])
        new = _advance(s, eos_ids, new_bj, n_acc, cache, exit_cache, key, d.n_draft)
        return new.replace(
            ctrl=control.update(ecfg.controller, s.ctrl, d.n_draft, n_acc, d.confidence, live),
            trace=None if s.trace is None else _record(s.trace, s.rounds, live, d, n_acc),
            fuse_prev=_fuse_prev(s, new, fuse_bjfd),
        )

    def tree_round(s: EESDState) -> EESDState:
        pos0, live = s.cache.lengths, ~s.done
        scale = None if s.tree_calib is None else tree.calibration(*s.tree_calib.T) * live
        fused = None if s.fuse_prev is None else exits.fuse_features(cfg, exit_params, s.fuse_prev)
        w = ecfg.tree_width
        if s.tree_ranks is not None:
            w = tree.choose_width(s.tree_ranks, R, ecfg.tree_width_stop, live)
        t, n_depth, predicted = tree.draft(
            cfg, ecfg, params, lower, exit_params, s.last, pos0, s.cache, s.exit_cache, scale, fused, w
        )
        logits, cache, uppers = tree.verify(cfg, ecfg, params, segments, t, pos0, n_depth, w)
        key, k_acc = jax.random.split(s.key)
        if sampling_cfg.greedy:
            n_acc, nxt, path = tree.accept_greedy(t, logits, ecfg.tree_width, n_depth, w)
        else:
            n_acc, nxt, path = tree.accept_sampled(k_acc, t, logits, ecfg.tree_width, n_depth, sampling_cfg, w)
        cache, exit_cache = tree.compact(cache, pos0, path), tree.compact(t.exit_cache, pos0, path)
        # As for a chain, over the accepted path's states, now contiguous.
        states = tuple(jnp.take_along_axis(a, path[..., None], 1) for a in (t.hidden, *uppers))
        positions = pos0[:, None] + jnp.arange(R + 1)
        exit_cache, fuse_brfd = _rewrite_verified(cfg, ecfg, exit_params, exit_cache, states, s.fuse_prev, positions)
        drafts = jnp.take_along_axis(t.tokens, path[:, 1:], 1)
        new_bj = jnp.where(jnp.arange(R)[None] < n_acc[:, None], drafts, nxt[:, None])
        new_bj = jnp.concatenate([new_bj, nxt[:, None]], 1)
        new = _advance(s, eos_ids, new_bj, n_acc, cache, exit_cache, key, jnp.full_like(n_acc, n_depth * w))
        new = new.replace(fuse_prev=_fuse_prev(s, new, fuse_brfd))
        if s.tree_ranks is not None:
            new = new.replace(
                tree_ranks=s.tree_ranks + tree.rank_counts(path, n_acc, n_depth, w, ecfg.tree_width, live)
            )
        if s.tree_calib is None:
            return new
        return new.replace(tree_calib=s.tree_calib + jnp.stack([n_acc, predicted], -1) * live[:, None])

    stop_at = state.steps + max_steps
    body = tree_round if ecfg.tree else round_
    return jax.lax.while_loop(lambda s: (~s.done).any() & (s.steps < stop_at), body, state)


def _rewrite_verified(cfg, ecfg, exit_params, exit_cache, states, fuse_prev, positions_bt):
    """The exit's cache at a verified block's positions rewritten from its verified states (a chain's
    block, a tree's accepted path; `states` [B, T, D] after each of ecfg.state_layers): a context
    exit's from the context layer, a fused exit's inputs from the previous positions' fused states
    (its own outputs stood in while drafting). Returns (exit_cache, [B, T, F, D] fuse-layer states or None).
    """
    fuse_btfd = None
    if ecfg.context_layer:
        context_btd = _at(cfg, ecfg, states, [ecfg.context_layer])[..., 0, :]
        exit_cache = exits.write_context(cfg, exit_params, exit_cache, context_btd, positions_bt)
    if ecfg.fuse_layers:
        fuse_btfd = _at(cfg, ecfg, states, ecfg.fuse_layers)
        if not ecfg.context_layer:  # With a context layer, the context replaced these slots already.
            feats = exits.previous_features(
                exits.fuse_features(cfg, exit_params, fuse_btfd), exits.fuse_features(cfg, exit_params, fuse_prev)
            )
            exit_in = exits.fused_input(states[0], exit_params, feats)
            exit_cache = exits.write_context(cfg, exit_params, exit_cache, exit_in, positions_bt)
    return exit_cache, fuse_btfd


def _fuse_prev(s: EESDState, new: EESDState, fuse_btfd) -> jax.Array | None:
    """EESDState.fuse_prev after a round: the block's fuse-layer states before the new `last`
    (block position n_keep - 1), for live rows."""
    if fuse_btfd is None:
        return s.fuse_prev
    n_keep = new.n_new - s.n_new
    kept = jnp.take_along_axis(fuse_btfd, jnp.maximum(n_keep - 1, 0)[:, None, None, None], axis=1)[:, 0]
    return jnp.where((~s.done)[:, None, None], kept, s.fuse_prev)


def _advance(s: EESDState, eos_ids, new_bj, n_acc, cache, exit_cache, key, n_draft) -> EESDState:
    """s after a round: new_bj [B, J+1] (n_acc accepted drafts, then the LLM's token) appended and
    cut by EOS / budget per row, both caches rolled back to the kept length; finished rows unchanged."""
    pos0, live = s.cache.lengths, ~s.done
    n_keep, done = finish_block(new_bj, (n_acc + 1) * live, s.n_new, s.max_new, eos_ids)
    lengths = pos0 + n_keep
    last = jnp.take_along_axis(new_bj, jnp.maximum(n_keep - 1, 0)[:, None], axis=1)[:, 0]
    return s.replace(
        tokens=append_tokens(s.tokens, s.n_new, new_bj, n_keep),
        n_new=s.n_new + n_keep,
        last=jnp.where(live, last, s.last),
        done=s.done | (done & live),
        cache=cache.replace(lengths=lengths),
        exit_cache=exit_cache.replace(lengths=lengths),
        key=key,
        rounds=s.rounds + live,
        drafted=s.drafted + n_draft * live,
        accepted=s.accepted + jnp.minimum(n_acc, n_keep) * live,
        steps=s.steps + 1,
    )
