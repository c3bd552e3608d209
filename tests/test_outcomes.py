"""EESD's round trace records what really happened: checked against an offline replay of the rounds."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eesd_jax import control, decoding, eesd, exits, generate, losses, model, outcomes
from eesd_jax.policies import gate

CFG = model.ModelConfig(
    vocab_size=96, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=256
)
N, C, J = 1, 3, 4
PROMPTS = [[5, 17, 3], [9, 1, 44, 60, 2, 8, 31, 11, 70, 4, 3], [12, 13, 14, 15, 16, 17]]


@pytest.fixture(scope="module")
def setup():
    params = model.init_params(CFG, jax.random.key(0), scale=0.3)
    # As after training: the LLM's last block, perturbed, over top-layer context (the hardest case:
    # each draft's attention mixes context-layer and layer-N slots by where its round began).
    ep = exits.init_exit(CFG, params, exits.ExitConfig(N, own_head=True, context_layer=C))
    ep = jax.tree.map(lambda w: w + 0.05 * jax.random.normal(jax.random.key(1), w.shape), ep)
    ecfg = eesd.EESDConfig(N, J, control.ControllerConfig("fixed"), context_layer=C)
    plain = generate.generate_eesd(CFG, params, ep, ecfg, PROMPTS, 24)
    traced = generate.generate_eesd(CFG, params, ep, dataclasses.replace(ecfg, trace=True), PROMPTS, 24)
    return params, ep, plain, traced


def test_tracing_changes_nothing_else(setup):
    _, _, plain, traced = setup
    assert plain.trace is None
    assert traced.tokens == plain.tokens and traced.stats == plain.stats
    t, rounds = traced.trace, np.asarray(traced.stats["per_row"]["rounds"])
    assert t.n_draft.sum() == traced.stats["drafted"] and 0 < traced.stats["accepted"] < traced.stats["drafted"]
    assert (t.n_accepted <= t.n_draft).all()
    ran = np.arange(t.n_draft.shape[1])[None] < rounds[:, None]
    # Rounds past a row's count hold nothing; `fixed` drafts J but for the budget's last rounds.
    assert (t.n_draft[~ran] == 0).all() and np.median(t.n_draft[ran]) == J


def test_every_judged_draft_matches_an_offline_replay(setup):
    """Each judged draft's recorded top probability and verdict are what the exit gives, teacher-forced
    over the final sequence with its round's start (losses.exit_train_logits), against AR's token."""
    params, ep, _, traced = setup
    t, rounds = traced.trace, traced.stats["per_row"]["rounds"]
    d = outcomes.drafts([t], [rounds])
    seqs = [prompt + traced.tokens[b] for b, prompt in enumerate(PROMPTS)]
    T = max(map(len, seqs))
    tokens = np.array([s + [0] * (T - len(s)) for s in seqs])  # Causal: the padding changes nothing before it.
    _, _, (h_n, h_c) = decoding.prefill(
        CFG, params, jnp.asarray(tokens), jnp.asarray([len(s) for s in seqs]), T, eesd.split_params(params, N, C)
    )
    starts, round_start = np.tile(np.arange(T), (len(seqs), 1)), {}
    for b, prompt in enumerate(PROMPTS):
        pos = len(prompt)  # Round 0 drafts from the first new token.
        for r in range(rounds[b]):
            round_start[b, r] = pos
            starts[b, pos : pos + J + 1] = pos
            pos += int(t.n_accepted[b, r]) + 1
    logits = losses.exit_train_logits(CFG, ep["head"], ep, h_n, None, h_c, jnp.asarray(starts))
    q_btv = np.asarray(jax.nn.softmax(logits))
    vocab = np.asarray(ep["vocab"]) if "vocab" in ep else np.arange(CFG.vocab_size)
    checked = 0
    for b, seq in enumerate(seqs):
        q = q_btv[b]
        # Row b's samples in trace order, round by round: the drafts up to the first rejection.
        rows_b = np.nonzero(d.row == b)[0]
        judged = np.minimum(t.n_accepted[b] + 1, t.n_draft[b])
        expect = [(r, j) for r in range(rounds[b]) for j in range(int(judged[r]))]
        assert len(rows_b) == len(expect)
        checked += len(expect)
        for i, (r, j) in zip(rows_b, expect, strict=True):
            at = round_start[b, r] + j
            assert d.position[i] == j
            np.testing.assert_allclose(d.feature("prob")[i], float(q[at].max()), atol=1e-5)
            assert d.accepted[i] == (vocab[int(q[at].argmax())] == seq[at + 1])
    assert checked == d.position.size > 10
    by_pos = outcomes.acceptance_by_position(d, J)
    assert [p["judged"] for p in by_pos] == [int((d.position == i).sum()) for i in range(J)]
    assert sum(p["accepted"] for p in by_pos) == traced.stats["accepted"]


def test_fitted_gate_weights_ride_beside_the_exit(tmp_path):
    exit_path = tmp_path / "x_N1.safetensors"
    exit_path.write_bytes(b"")  # Only its name matters here.
    assert control.for_exit(control.from_spec("gate"), exit_path).gate_weights == ()  # Nothing fitted: UNTRAINED.
    w = (-1.0, 3.0, -0.5, 1.0, 0.25, -2.0)
    path = gate.save_fitted(exit_path, w, {"fitted_on": "test"})
    assert path.name == "x_N1.gate.json" and json.loads(path.read_text())["fitted_on"] == "test"
    assert control.for_exit(control.from_spec("gate:gate_threshold=0.6"), exit_path).gate_weights == w
    given = control.from_spec("gate:gate_weights=1+2+3+4+5+6")
    assert control.for_exit(given, exit_path) == given  # Weights given by the user win.
    assert control.for_exit(control.from_spec("confidence"), exit_path).gate_weights == ()
    for bad in ("{", "[1, 2]", '{"format": "eesd_jax.gate/1", "weights": [1, 2]}'):
        path.write_text(bad)
        with pytest.raises(ValueError, match="x_N1.gate.json"):
            gate.load_fitted(exit_path)
    body = {"format": gate.FORMAT, "features": list(gate.FEATURES), "weights": [1, 2, 3, 4, 5, float("nan")]}
    path.write_text(json.dumps(body))
    with pytest.raises(ValueError, match="finite"):
        gate.load_fitted(exit_path)
    with pytest.raises(ValueError, match="gate_weights needs"):
        gate.save_fitted(exit_path, (1.0, 2.0), {})
