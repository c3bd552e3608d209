"""LLaMA-3.1-8B-Instruct, self-distilled on a TPU v4-8 (default), a v5e-8 or 8 x H100 (ARG hw=v5e-8 / hw=h100x8).

    eesd distill --config llama3.1-8b-instruct:model=checkpoints/Llama-3.1-8B-Instruct --workdir runs/llama3.1-8b-instruct
    eesd distill --config llama3.1-8b-instruct:hw=h100x8,model=checkpoints/Llama-3.1-8B-Instruct

model: the local Hugging Face folder (config.json, safetensors, tokenizer, generation_config.json).
Mesh, batch sizes and the memory arithmetic behind them: eesd_jax/configs/_pod.py.
"""

from __future__ import annotations

import ml_collections

from eesd_jax.configs import _pod


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return _pod.pod_config("llama3.1-8b", "llama3.1-8b-instruct", "checkpoints/Llama-3.1-8B-Instruct", arg)
