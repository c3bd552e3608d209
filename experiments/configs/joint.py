"""Exits at N = 2 and 4 trained together, at a quarter of the recipe's steps, as reported (docs/studies.md):
`python experiments/ablate.py --study joint`. Reuses the responses of an earlier distillation in
runs/data (`eesd distill --config smollm2:data.dir=runs/data` makes them) and trains in
runs/joint_smollm2 (resumable)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "config": "smollm2:data.dir=runs/data,train.steps=100",
            "knobs": {"joint": {"workdir": "runs/joint_smollm2"}},
        }
    )
