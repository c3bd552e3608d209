"""LLaMA-2-7B-chat, self-distilled on a TPU v4-8 (default), a v5e-8 or 8 x H100 (ARG hw=v5e-8 / hw=h100x8).

    eesd distill --config llama2-7b-chat:model=checkpoints/Llama-2-7b-chat-hf --workdir runs/llama2-7b-chat
    eesd distill --config llama2-7b-chat:hw=h100x8,model=checkpoints/Llama-2-7b-chat-hf

model: the local Hugging Face folder (config.json, safetensors, tokenizer, generation_config.json).
Mesh, batch sizes and the memory arithmetic behind them: eesd_jax/configs/_pod.py.
"""

from __future__ import annotations

import ml_collections

from eesd_jax.configs import _pod


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return _pod.pod_config("llama2-7b", "llama2-7b-chat", "checkpoints/Llama-2-7b-chat-hf", arg)
