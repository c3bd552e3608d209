"""eesd_jax: Early-exiting Speculative Decoding (EESD) in JAX.

Lossless faster decoding for LLaMA-family models: a slice of the model plus one trained
early-exiting layer drafts tokens, the full model verifies them in one pass. See README.md.
Submodules are imported explicitly (e.g. `from eesd_jax import generate`); importing the
package itself is cheap and does not import JAX.
"""

__version__ = "0.1.0"
