"""The draft-stop policies study as reported (docs/studies.md): `python experiments/ablate.py --study policies`.

Every registered policy, two knob settings each (four for `confidence`), tuned on 4 prompts; the
study's defaults (ablate.study_config: three to five settings, 8 tuning prompts) take about two
hours on a 2-core CPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "config": "smollm2",
            "knobs": {
                "policies": {
                    "tune_n": 4,
                    "kinds": (
                        "confidence",
                        "expected-gain",
                        "calibration-ts",
                        "beta-ts",
                        "fixed",
                        "gate",
                        "entropy",
                        "margin",
                        "patience",
                        "saturation",
                        "budget",
                    ),
                    "grid": {
                        "confidence": ("threshold=0.3", "threshold=0.4", "threshold=0.5", "threshold=0.6"),
                        "expected-gain": ("draft_cost=0.15", "draft_cost=0.24"),
                        "calibration-ts": ("break_even=0.0", "break_even=0.3"),
                        "beta-ts": ("break_even=0.0", "break_even=0.5"),
                        "gate": ("gate_threshold=0.4", "gate_threshold=0.6"),
                        "entropy": ("max_entropy=1.0", "max_entropy=2.0"),
                        "margin": ("min_margin=0.1", "min_margin=0.3"),
                        "patience": ("patience=1", "patience=2"),
                        "saturation": ("saturation=0.8", "saturation=0.9"),
                        "budget": ("budget=1.0", "budget=2.0"),
                    },
                }
            },
        }
    )
