"""7B/8B recipes for a TPU v4-8, a TPU v5e-8 and 8 x H100: shapes, meshes, batch sizes, and why they fit.

The config files llama2-7b-chat.py, llama3.1-8b-instruct.py and qwen2.5-7b-instruct.py call
`pod_config`. ARG `hw=v4-8|v5e-8|h100x8` picks the preset (mesh, generation / teacher-pass
batch, training batch); other overrides win over the preset; `model=PATH` names the local
Hugging Face folder (nothing is downloaded):

    eesd distill --config llama3.1-8b-instruct:hw=v5e-8,model=/ckpt/Llama-3.1-8B-Instruct --dtype bfloat16

Memory per chip, bfloat16 teacher (`memory_per_chip_gb`, checked by tests/test_configs.py to stay
under 85% of HBM). With data=D, model=M and a generation / teacher batch of B rows (B / D rows per
chip group), sequences of T = max_prompt_tokens + max_new_tokens + 32 positions:
  * weights: 2 bytes x params / M (Megatron split over 'model'; embeddings over vocab);
  * KV cache: B/D x T x 2 (k, v) x L x K x E x 2 bytes, / M when M divides K;
  * teacher pass: B/D x T x V float32 logits and their log-softmax (x 2), / M (vocab split).
                     params  weights  KV/row(T=800)  logits/row(T=800)
  LLaMA-2-7B-chat    6.74 B  13.5 GB  0.42 GB        0.20 GB
  LLaMA-3.1-8B-Inst  8.03 B  16.1 GB  0.10 GB        0.82 GB
  Qwen2.5-7B-Inst    7.62 B  15.2 GB  0.05 GB        0.97 GB
  v4-8    4 chips x 32 GB, data=4,model=1, B=32  (8 rows/chip): 18.5 / 23.5 / 23.4 GB per chip
  v5e-8   8 chips x 16 GB, data=4,model=2, B=32  (8 rows/group): 9.2 / 11.7 / 11.7 GB
  8xH100  8 GPUs x 80 GB,  data=8,model=1, B=256 (32 rows/GPU): 33.5 / 45.7 / 47.8 GB
The exit (one decoder block + an 8192-token draft head, ~0.25 B params) trains with float32 AdamW
state, params + grads + 2 moments (~4 GB); its batches are 8 MB of float32 layer-N states per 512-position sequence.
These budgets assume generation rows split over 'data' (DESIGN: every distillation stage on the
mesh): until distill's generation shards its rows, each chip holds all B rows, so divide B by D.
Host RAM: the distillation data is ~17 KB per position in float32 (4096-wide states + top-64
log-probs), 17 GB per million positions.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from eesd_jax import shapes
from eesd_jax.configs import apply_overrides, base_config

# The recipes' models (ModelConfig fields; eesd_jax/shapes.py).
SHAPES = {key: {**shapes.SHAPES[key], "name": key} for key in ("llama2-7b", "llama3.1-8b", "qwen2.5-7b")}


@dataclasses.dataclass(frozen=True)
class Hardware:
    chips: int
    hbm_gb: float  # Per chip.
    mesh: str
    batch_size: int  # data.batch_size: generation and teacher-pass rows (global, split over 'data').
    train_batch_size: int


HARDWARE = {
    "v4-8": Hardware(chips=4, hbm_gb=32, mesh="data=4,model=1", batch_size=32, train_batch_size=32),
    "v5e-8": Hardware(chips=8, hbm_gb=16, mesh="data=4,model=2", batch_size=32, train_batch_size=32),
    "h100x8": Hardware(chips=8, hbm_gb=80, mesh="data=8,model=1", batch_size=256, train_batch_size=64),
}


def param_count(shape: dict) -> int:
    D, L, F, V = shape["d_model"], shape["n_layers"], shape["ffn_dim"], shape["vocab_size"]
    q, kv = shape["n_heads"] * shape["head_dim"], shape["n_kv_heads"] * shape["head_dim"]
    per_layer = 2 * D * q + 2 * D * kv + 3 * D * F + 2 * D + (q + 2 * kv if shape.get("qkv_bias") else 0)
    return L * per_layer + 2 * V * D + D  # Untied embeddings and head, final norm.


def memory_per_chip_gb(shape: dict, hw: Hardware, batch: int, seq: int) -> dict[str, float]:
    """The dominant per-chip terms of the generation and teacher pass, in GB (module docstring)."""
    from eesd_jax import sharding

    sizes = sharding.parse_mesh(hw.mesh)
    data, tp = sizes["data"], sizes["model"]
    rows = batch / data
    kv_split = tp if shape["n_kv_heads"] % tp == 0 else 1
    out = {
        "weights": 2 * param_count(shape) / tp,
        "kv_cache": rows * seq * 2 * shape["n_layers"] * shape["n_kv_heads"] * shape["head_dim"] * 2 / kv_split,
        "teacher_logits": 2 * rows * seq * shape["vocab_size"] * 4 / tp,
    }
    out = {k: v / 1e9 for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def pod_config(model_key: str, name: str, source: str, arg: str | None) -> ml_collections.ConfigDict:
    """A distillation config for SHAPES[model_key] from the local HF folder `source`, preset by ARG hw=."""
    c = base_config()
    c.name = name
    c.hw = "v4-8"
    c.model.source = source
    c.model.dtype = "bfloat16"
    c.exit.layer = 2  # ~1/16 of the depth, as the measured best on SmolLM2 (2 of 30); untested at 7B.
    c.exit.draft_vocab = 8192
    c.exit.file_dtype = "float16"
    c.data.samples_per_prompt = 2
    c.data.max_prompt_tokens = 512
    c.data.max_new_tokens = 256
    c.data.temperature = 0.6
    c.data.top_p = 1.0
    c.train.steps = 2000
    c.train.seq_len = 512
    c.train.lr = 1e-3
    c.train.warmup_steps = 100
    c.train.val_every_prompt = 10
    c.train.val_every = 200
    c.train.ckpt_every = 200
    apply_overrides(c, arg)  # Learn hw (and check every override) first,
    if c.hw not in HARDWARE:
        raise ValueError(f"hw must be one of {', '.join(HARDWARE)}, got {c.hw!r}")
    hw = HARDWARE[c.hw]
    c.mesh = hw.mesh
    c.data.batch_size, c.train.batch_size = hw.batch_size, hw.train_batch_size
    return apply_overrides(c, arg)  # then let explicit overrides win over the preset.
