"""EESD sampling is lossless: its samples have exactly AR's distribution (docs/design.md, invariant 4).

On a 16-token vocabulary we enumerate the exact distribution of the first three
generated tokens (16^3 outcomes) from the LLM's own warped logits, draw tens of
thousands of EESD samples through an untrained (so badly mismatched) exit, and
apply a chi-square test. The test has teeth: a wrong acceptance rule fails it,
and the sample size is shown to reject a 2% (total variation) deviation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fast_first
from scipy import stats

from eesd_jax import control, eesd, exits, generate, model, sampling
from eesd_jax.kv_cache import init_cache
from eesd_jax.sampling import SamplingConfig

CFG = model.ModelConfig(
    vocab_size=16, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=64, max_seq_len=64
)
PROMPT = [3, 1, 4, 1, 5, 9]
ROWS, SEEDS = 5000, 8  # 40,000 samples per configuration.
P_VALUE = 1e-3


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.key(42), scale=0.35)


def exact_distribution(params, sc: SamplingConfig) -> np.ndarray:
    """[V, V, V] probability of (t1, t2, t3) under vanilla sampling, by enumeration."""
    V, P = CFG.vocab_size, len(PROMPT)
    t1, t2 = np.divmod(np.arange(V * V), V)
    tokens = np.concatenate([np.tile(PROMPT, (V * V, 1)), t1[:, None], t2[:, None]], axis=1)
    cache = init_cache(CFG, V * V, P + 2)
    positions = jnp.broadcast_to(jnp.arange(P + 2), tokens.shape)
    logits, _ = model.forward(CFG, params, jnp.asarray(tokens), positions, cache)
    p = np.asarray(jnp.exp(sampling.warp(logits[:, P - 1 :], sc)), np.float64)  # [V*V, 3, V]
    p1 = p[0, 0]  # Same prompt in every row.
    p2 = p[::V, 1]  # Rows with t2 = 0 give p(t2 | t1) for each t1: [V, V].
    p3 = p[:, 2].reshape(V, V, V)
    joint = p1[:, None, None] * p2[:, :, None] * p3
    return joint / joint.sum()


def eesd_counts(params, sc, ecfg, exit_params=None) -> np.ndarray:
    V = CFG.vocab_size
    if exit_params is None:
        exit_params = exits.init_exit(CFG, params, exits.ExitConfig(ecfg.exit_layer, context_layer=ecfg.context_layer))
    counts = np.zeros(V**3, np.int64)
    for seed in range(SEEDS):
        out = generate.generate_eesd(CFG, params, exit_params, ecfg, [PROMPT] * ROWS, 3, sc, seed=seed)
        t = np.array(out.tokens)
        np.add.at(counts, t[:, 0] * V * V + t[:, 1] * V + t[:, 2], 1)
    return counts


def chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square p-value; cells expecting < 5 are pooled into one."""
    expected = probs.ravel() * counts.sum()
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    assert (obs[-1] == 0 and exp[-1] < 1e-6) or exp[-1] > 0
    if exp[-1] < 1e-6:
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def shifted(probs: np.ndarray, tv: float) -> np.ndarray:
    """probs with `tv` mass moved from the likeliest outcome to the second likeliest."""
    flat = probs.ravel().copy()
    first, second = np.argsort(flat)[::-1][:2]
    flat[first] -= tv
    flat[second] += tv
    return flat.reshape(probs.shape)


SAMPLING = [
    SamplingConfig(temperature=1.0),
    SamplingConfig(temperature=0.7, top_k=5),
    SamplingConfig(temperature=1.3, top_p=0.8),
]


@pytest.mark.parametrize("sc", fast_first(SAMPLING), ids=["t1.0", "t0.7-topk5", "t1.3-topp0.8"])
def test_eesd_samples_have_the_ar_distribution(params, sc):
    exact = exact_distribution(params, sc)
    ecfg = eesd.EESDConfig(exit_layer=1, max_draft=2, controller=control.ControllerConfig("fixed"))
    counts = eesd_counts(params, sc, ecfg)
    assert chi_square_p(counts, exact) > P_VALUE
    # Power: the same samples reject a reference that is off by 2% in total variation.
    assert chi_square_p(counts, shifted(exact, 0.02)) < P_VALUE
    if sc.top_k or sc.top_p < 1:  # Nothing outside the support is ever emitted.
        assert counts[exact.ravel() == 0].sum() == 0


@pytest.mark.slow
def test_eesd_sampling_with_a_context_exit(params):
    """An exit whose verified context comes from layer 2 (ExitConfig.context_layer) keeps the distribution."""
    sc = SAMPLING[1]
    ecfg = eesd.EESDConfig(exit_layer=1, max_draft=2, controller=control.ControllerConfig("fixed"), context_layer=2)
    assert chi_square_p(eesd_counts(params, sc, ecfg), exact_distribution(params, sc)) > P_VALUE


@pytest.mark.slow
def test_eesd_sampling_with_a_fused_exit(params):
    """An exit fusing the previous position's final and layer-2 states (ExitConfig.fuse_layers) keeps the
    distribution; its fusion weights are nonzero, so the drafts really read them."""
    sc, fuse = SAMPLING[2], (2, CFG.n_layers)
    ecfg = eesd.EESDConfig(exit_layer=1, max_draft=2, controller=control.ControllerConfig("fixed"), fuse_layers=fuse)
    ep = exits.init_exit(CFG, params, exits.ExitConfig(1, fuse_layers=fuse))
    ep["fuse"]["w"] = 0.05 * jax.random.normal(jax.random.key(1), ep["fuse"]["w"].shape)
    assert chi_square_p(eesd_counts(params, sc, ecfg, ep), exact_distribution(params, sc)) > P_VALUE


def always_accept(key, draft_bj, n_draft_b, draft_logp_bjv, target_logits_bjv, cfg):
    """A deliberately wrong rule: accept every draft token (output = the drafter's)."""
    B = draft_bj.shape[0]
    p = jnp.exp(sampling.warp(target_logits_bjv, cfg))
    nxt = jax.random.categorical(key, jnp.log(jnp.take_along_axis(p, n_draft_b[:, None, None], axis=1)[:, 0]))
    return n_draft_b, nxt.astype(jnp.int32).reshape(B)


@pytest.mark.slow
@pytest.mark.parametrize("sc", SAMPLING[:1], ids=["t1.0"])
def test_mutated_acceptance_rule_is_caught(params, sc, monkeypatch):
    """The losslessness test must fail when the acceptance rule is wrong."""
    monkeypatch.setattr(sampling, "accept_sampled", always_accept)
    jax.clear_caches()  # Drop traces made with the correct rule.
    try:
        ecfg = eesd.EESDConfig(exit_layer=1, max_draft=2, controller=control.ControllerConfig("fixed"))
        counts = eesd_counts(params, sc, ecfg)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    assert chi_square_p(counts, exact_distribution(params, sc)) < P_VALUE
