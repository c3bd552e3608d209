"""Qwen2.5-7B-Instruct, self-distilled on a TPU v4-8 (default), a v5e-8 or 8 x H100 (ARG hw=v5e-8 / hw=h100x8).

    eesd distill --config qwen2.5-7b-instruct:model=checkpoints/Qwen2.5-7B-Instruct --workdir runs/qwen2.5-7b-instruct
    eesd distill --config qwen2.5-7b-instruct:hw=h100x8,model=checkpoints/Qwen2.5-7B-Instruct

model: the local Hugging Face folder (config.json, safetensors, tokenizer, generation_config.json).
Mesh, batch sizes and the memory arithmetic behind them: eesd_jax/configs/_pod.py.
"""

from __future__ import annotations

import ml_collections

from eesd_jax.configs import _pod


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return _pod.pod_config("qwen2.5-7b", "qwen2.5-7b-instruct", "checkpoints/Qwen2.5-7B-Instruct", arg)
