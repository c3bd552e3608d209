"""The N x K grid with the `fixed` controller, as reported (docs/studies.md):
`python experiments/ablate.py --study depth` (one prompt per set, prompts cut to 48 tokens)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"config": "smollm2", "knobs": {"n_per_set": 1, "max_prompt_tokens": 48}})
