"""The EESD paper's parts one at a time, as reported (docs/studies.md):
`python experiments/ablate.py --study components` (ablate.study_config's defaults)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"config": "smollm2", "knobs": {}})
