"""Real models' shapes: ModelConfig fields as their Hugging Face config.json gives them.

One table for everything that needs a model's size without its weights: benchmarks on random
weights (bench.RANDOM_SHAPES), the 7B/8B distillation recipes' memory arithmetic
(configs/_pod.py), collective counts and loading-memory measurements (experiments/).
"""

from __future__ import annotations

SHAPES: dict[str, dict] = {
    "smollm2": dict(  # SmolLM2-135M (the bundled model).
        vocab_size=49152,
        d_model=576,
        n_layers=30,
        n_heads=9,
        n_kv_heads=3,
        head_dim=64,
        ffn_dim=1536,
        rope_theta=100000.0,
        tie_embeddings=True,
        max_seq_len=8192,
    ),
    "1b": dict(  # LLaMA-3.2-1B.
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        ffn_dim=8192,
        rope_theta=500000.0,
        tie_embeddings=True,
        max_seq_len=8192,
    ),
    "8b": dict(  # LLaMA-3-8B.
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=14336,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
    "llama2-7b": dict(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        ffn_dim=11008,
        rope_theta=10000.0,
        rms_eps=1e-5,
        max_seq_len=4096,
    ),
    "llama3.1-8b": dict(
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=14336,
        rope_theta=500000.0,
        rms_eps=1e-5,
        max_seq_len=131072,
        rope_scaling=(8.0, 1.0, 4.0, 8192),
    ),
    "qwen2.5-7b": dict(
        vocab_size=152064,
        d_model=3584,
        n_layers=28,
        n_heads=28,
        n_kv_heads=4,
        head_dim=128,
        ffn_dim=18944,
        rope_theta=1000000.0,
        rms_eps=1e-6,
        qkv_bias=True,
        max_seq_len=32768,
    ),
}
