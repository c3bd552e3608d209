"""fixed: always draft max_draft tokens (baseline; the engine enforces the cap)."""

import jax.numpy as jnp


def decide(cfg, state, features, key):
    return jnp.ones(features.prob.shape, bool)
