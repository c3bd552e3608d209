"""Draft-stop policies: the registry's contract for every policy, and each new policy's own rule.

(The paper's controllers have theirs in test_control.py; losslessness of every registered
policy is checked in test_eesd.py and test_eesd_sampling_policies.py.)
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_control import feats

from eesd_jax import control
from eesd_jax.policies import base, budget, gate, patience, saturation

J = 6


@pytest.mark.parametrize("kind", control.KINDS)
def test_every_policy_keeps_the_contract(kind):
    """Per-row state, jittable decide inside a while loop, deterministic given the key, and
    update leaves rows that were not live untouched."""
    cfg = control.ControllerConfig(kind)
    B = 3
    state = control.init(cfg, B)
    assert all(leaf.shape[0] == B for leaf in jax.tree.leaves(state))
    f = feats(
        [0.2, 0.6, 0.95],
        step=1,
        max_draft=J,
        entropy=[3.0, 1.0, 0.1],
        margin=[0.05, 0.4, 0.9],
        cosine=[0.5, 0.9, 0.99],
        round_probs=np.full((B, J), 0.5),
    )

    def loop(state, key):  # As the engine calls it: inside lax.while_loop.
        body = lambda c: (c[0] + 1, control.decide(cfg, state, f, jax.random.fold_in(key, c[0])))
        return jax.lax.while_loop(lambda c: c[0] < 2, body, (0, jnp.zeros(B, bool)))[1]

    keep = jax.jit(loop)(state, jax.random.key(3))
    assert keep.shape == (B,) and keep.dtype == jnp.bool_
    assert (keep == jax.jit(loop)(state, jax.random.key(3))).all()
    conf = jnp.tile(jnp.array([0.9, 0.2, 0.7, 0.4, 0.8, 0.1]), (B, 1))
    new = control.update(cfg, state, jnp.array([4, 2, 5]), jnp.array([1, 2, 0]), conf, jnp.array([True, False, True]))
    for old_leaf, new_leaf in zip(jax.tree.leaves(state), jax.tree.leaves(new), strict=True):
        np.testing.assert_array_equal(np.asarray(new_leaf[1]), np.asarray(old_leaf[1]))


def test_every_knob_has_one_owner_and_keeps_its_default():
    cfg = control.ControllerConfig()
    for module in control.POLICIES.values():
        for f in dataclasses.fields(getattr(module, "Knobs", base.NoKnobs)):
            assert getattr(cfg, f.name) == f.default
    assert control.ControllerConfig.kind == "confidence"
    assert hash(control.ControllerConfig("gate")) == hash(control.ControllerConfig("gate"))  # jit-static.


@pytest.mark.parametrize(
    "bad",
    [
        dict(max_entropy=-1.0),
        dict(min_margin=1.5),
        dict(patience=0),
        dict(saturation=1.5),
        dict(saturation_temp=-1.0),
        dict(budget=-1.0),
        dict(budget_lr=0.0),
        dict(budget_thresholds=()),
        dict(gate_weights=(1.0, 2.0)),
        dict(gate_threshold=2.0),
        dict(draft_cost=-0.1),
    ],
)
def test_bad_policy_knobs_are_refused(bad):
    with pytest.raises(ValueError):
        control.ControllerConfig(**bad)


def decide(kind, f, **knobs):
    cfg = control.ControllerConfig(kind, **knobs)
    return control.decide(cfg, control.init(cfg, f.prob.shape[0]), f, jax.random.key(0)).tolist()


def test_entropy_keeps_drafting_up_to_its_threshold():
    f = feats([0.5] * 4, entropy=[0.5, 1.99, 2.0, 2.01])
    assert decide("entropy", f, max_entropy=2.0) == [True, True, True, False]


def test_margin_keeps_drafting_from_its_threshold():
    f = feats([0.5] * 4, margin=[0.0, 0.29, 0.3, 0.8])
    assert decide("margin", f, min_margin=0.3) == [False, False, True, True]


def test_expected_gain_drafts_while_the_rounds_product_pays_for_the_cost():
    # Step 2: the earlier drafts' probabilities multiply in; later slots (>= step) must not.
    rp = np.array([[0.8, 0.5, 0.01], [0.8, 0.5, 0.01], [0.6, 0.6, 0.01], [1.0, 1.0, 0.0]])
    f = feats([0.61, 0.59, 0.66, 0.24], step=2, max_draft=3, round_probs=rp)
    # Products: 0.244, 0.236, 0.2376, 0.24 (equal to the cost: keep).
    assert decide("expected-gain", f, draft_cost=0.24) == [True, False, False, True]
    first = feats([0.25, 0.2], step=0, max_draft=3, round_probs=np.zeros((2, 3)))  # No earlier draft.
    assert decide("expected-gain", first, draft_cost=0.24) == [True, False]


def reference_falls(probs, i):
    """Consecutive falls ending at step i, by a plain loop."""
    run = 0
    for j in range(i, 0, -1):
        if probs[j] < probs[j - 1]:
            run += 1
        else:
            break
    return run


def test_patience_counts_falls_in_a_row_like_a_plain_loop():
    rng = np.random.default_rng(0)
    seqs = np.round(rng.random((64, J)), 1)  # Rounded: ties (not falls) happen too.
    for i in range(J):
        round_probs = np.where(np.arange(J) < i, seqs, -1.0)  # Entries from step i on are not yet valid.
        f = feats(seqs[:, i], step=i, max_draft=J, round_probs=round_probs)
        got = np.asarray(patience.falls_in_a_row(f))
        want = [reference_falls(s, i) for s in seqs]
        np.testing.assert_array_equal(got, want)
        for P in (1, 2):
            assert decide("patience", f, patience=P) == [w < P for w in want]


def test_saturation_threshold_decays_with_depth_in_closed_form():
    cfg = control.ControllerConfig("saturation", saturation=0.9, saturation_temp=4.0)
    lam = np.array([float(saturation.threshold(cfg, i, J)) for i in range(J)])
    np.testing.assert_allclose(lam, 0.9 * (0.9 + 0.1 * np.exp(-4.0 * np.arange(J) / J)), rtol=1e-6)
    assert lam[0] == pytest.approx(0.9) and (np.diff(lam) < 0).all()
    flat = control.ControllerConfig("saturation", saturation=0.9, saturation_temp=0.0)
    assert float(saturation.threshold(flat, J - 1, J)) == pytest.approx(0.9)
    cos = [0.85, 0.86]  # Below lambda_0 = 0.9, above lambda_5 = 0.9 * (0.9 + 0.1 e^{-10/3}) ~ 0.813.
    assert decide("saturation", feats([0.5, 0.5], step=0, max_draft=J, cosine=cos)) == [False, False]
    assert decide("saturation", feats([0.5, 0.5], step=5, max_draft=J, cosine=cos)) == [True, True]
    assert decide("saturation", feats([0.5, 0.5], step=5, max_draft=J, cosine=[0.8, 0.82])) == [False, True]


def test_budget_update_scores_every_threshold_on_the_round():
    cfg = control.ControllerConfig(
        "budget", budget=1.0, budget_eta=2.0, budget_lr=0.5, budget_thresholds=(0.0, 0.5, 0.85, 2.0)
    )
    s = budget.init(cfg, 1).replace(mu=jnp.array([0.2]))
    conf = jnp.array([[0.9, 0.6, 0.3, 0.95]])  # 3 drafted (index 3 is after the round's end: unseen).
    new = budget.update(cfg, s, jnp.array([3]), jnp.array([2]), conf)
    # Arms keep the leading run q >= tau of the drafted tokens: 3, 2, 1, 0 tokens; accepted min(2, run).
    np.testing.assert_allclose(new.cost[0], (1 - budget.MEMORY) * np.array([3, 2, 1, 0]), rtol=1e-6)
    np.testing.assert_allclose(new.value[0], (1 - budget.MEMORY) * np.array([2, 2, 1, 0]), rtol=1e-6)
    np.testing.assert_allclose(new.mu[0], 0.2 + 0.5 * (3 - 1.0) / 4, rtol=1e-6)
    # Weights: softmax(eta (value - mu cost)); keep probability: the weight of the arms q reaches.
    logits = 2.0 * (np.asarray(new.value[0]) - float(new.mu[0]) * np.asarray(new.cost[0]))
    pi = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(budget.keep_probability(cfg, new, jnp.array([0.7]))[0], pi[:2].sum(), rtol=1e-6)


def simulate_budget(budget_tokens, rounds=150, rows=64, max_draft=8, seed=0):
    """Mean drafted tokens per round, late rounds, against a calibrated source (accepted w.p. q ~ U(0, 1))."""
    cfg = control.ControllerConfig("budget", budget=budget_tokens)
    rng = np.random.default_rng(seed)
    state, key = control.init(cfg, rows), jax.random.key(seed)
    decide_ = jax.jit(lambda s, f, k: control.decide(cfg, s, f, k))
    update_ = jax.jit(lambda s, n, a, c: control.update(cfg, s, n, a, c, jnp.ones(rows, bool)))
    means = []
    for _ in range(rounds):
        q = rng.random((rows, max_draft)).astype(np.float32)
        n = np.zeros(rows, np.int32)
        going = np.ones(rows, bool)
        for i in range(max_draft):
            key, sub = jax.random.split(key)
            going &= np.asarray(decide_(state, feats(q[:, i], step=i, max_draft=max_draft), sub))
            n += going
        judged = rng.random((rows, max_draft)) < q
        accepted = np.minimum(np.argmin(np.append(judged, np.zeros((rows, 1), bool), 1), 1), n)
        state = update_(state, jnp.asarray(n), jnp.asarray(accepted, jnp.int32), jnp.asarray(q))
        means.append(n.mean())
    return float(np.mean(means[rounds // 2 :]))


def test_budget_holds_the_mean_draft_length_to_its_budget():
    """A binding budget is met (unconstrained, it drafts ~2 tokens a round on this source); a loose one
    is kept, and more is drafted under it."""
    tight, loose = simulate_budget(1.0), simulate_budget(3.0)
    assert abs(tight - 1.0) < 0.15 and 1.5 < loose < 3.15, (tight, loose)


def test_gate_default_is_the_confidence_rule_and_keeps_from_its_threshold():
    probs = [0.1, 0.49, 0.51, 0.9]
    assert decide("gate", feats(probs)) == decide("confidence", feats(probs), threshold=0.5)
    w = (0.0, 0.0, 0.0, 0.0, 2.0, 0.0)  # p = sigmoid(2 cosine): 0.5 at cosine 0, 0.73 at 0.5.
    f = feats([0.5] * 3, cosine=[-0.1, 0.4, 0.6])
    assert decide("gate", f, gate_weights=w, gate_threshold=0.7) == [False, False, True]


def test_gate_fit_recovers_a_logistic_acceptance_model():
    rng = np.random.default_rng(1)
    n = 6000
    phi = np.column_stack([np.ones(n), rng.random(n), 4 * rng.random(n), rng.random(n), rng.random(n), rng.random(n)])
    w_true = np.array([-1.0, 3.0, -0.8, 1.0, 0.5, -1.5])
    accepted = rng.random(n) < 1 / (1 + np.exp(-phi @ w_true))
    w = np.array(gate.fit(phi, accepted, l2=1e-3))
    np.testing.assert_allclose(w, w_true, atol=0.35)
    # Fitted weights plug into the policy: it keeps what the model says is likely accepted.
    f = feats([0.95, 0.05], entropy=[0.2, 3.5], margin=[0.9, 0.0], cosine=[0.9, 0.1])
    assert decide("gate", f, gate_weights=tuple(w)) == [True, False]
    with pytest.raises(ValueError, match="fit needs"):
        gate.fit(phi[:, :3], accepted)


def test_register_adds_a_policy_with_its_knobs_and_refuses_clashes(monkeypatch):
    # Restored after the test: the registry is module state that later tests parametrize over.
    for name in ("POLICIES", "KINDS", "ControllerConfig"):
        value = getattr(control, name)
        monkeypatch.setattr(control, name, dict(value) if name == "POLICIES" else value)

    @dataclasses.dataclass(frozen=True)
    class Knobs:
        always_keep: bool = True

    def always(cfg, state, f, key):
        return jnp.full(f.prob.shape, cfg.always_keep)

    policy = types.SimpleNamespace(Knobs=Knobs, decide=always)
    before = control.ControllerConfig("gate")
    control.register("always", policy)
    assert control.KINDS[-1] == "always"
    assert decide("always", feats([0.1, 0.9])) == [True, True]
    assert decide("always", feats([0.1, 0.9]), always_keep=False) == [False, False]
    assert control.decide(before, control.init(before, 1), feats([0.9]), jax.random.key(0)).tolist() == [True]
    with pytest.raises(ValueError, match="already registered"):
        control.register("always", policy)
    with pytest.raises(TypeError, match="already"):  # A knob another policy owns.
        control.register("clash", types.SimpleNamespace(Knobs=gate.Knobs, decide=always))
    with pytest.raises(TypeError, match="decide"):
        control.register("empty", types.SimpleNamespace())
    assert control.KINDS[-1] == "always" and "clash" not in control.POLICIES
