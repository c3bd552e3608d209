"""A tiny random LLaMA teacher built in-process: the whole pipeline runs in seconds on CPU.

    eesd distill --config tiny --workdir /tmp/tiny
    eesd distill --config tiny:train.steps=100,N=1

Used by the tests. Prompts are real (chat / HumanEval text) read as bytes by a toy
tokenizer; the "fingerprint" is a hash of the model config and init seed.
"""

from __future__ import annotations

import ml_collections

from eesd_jax.configs import apply_overrides, base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "tiny"
    c.model.source = "tiny"
    c.model.tiny = ml_collections.ConfigDict(
        dict(
            vocab_size=101,
            d_model=32,
            n_layers=3,
            n_heads=4,
            n_kv_heads=2,
            head_dim=8,
            ffn_dim=64,
            rope_theta=500.0,
            max_seq_len=128,
            init_seed=0,
            init_scale=0.3,  # O(1) logits: distributions far from uniform.
            eos_id=0,
        )
    )
    c.exit.layer = 1
    c.exit.draft_vocab = 48

    c.data.n_per_set = 6
    c.data.max_prompt_tokens = 16
    c.data.max_new_tokens = 24
    c.data.temperature = 1.0
    c.data.top_p = 1.0
    c.data.batch_size = 6
    c.data.shard_size = 6  # Two shards.
    c.data.top_k = 16
    c.data.feature_layers = (2,)

    c.train.steps = 40
    c.train.batch_size = 4
    c.train.seq_len = 48
    c.train.seq_bucket = 48  # One compiled shape.
    c.train.lr = 3e-3
    c.train.warmup_steps = 4
    c.train.ckpt_every = 10
    c.train.max_to_keep = 3
    c.train.log_every = 5

    c.eval.n_per_set = 2
    c.eval.max_new_tokens = 16
    c.eval.max_draft = 4
    return apply_overrides(c, arg)
