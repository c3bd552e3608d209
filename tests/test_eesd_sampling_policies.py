"""EESD sampling keeps AR's distribution under every draft-stop policy (the chi-square test of
test_eesd_sampling.py, one sampling config each). A file of its own so that the test runner's
two workers share the sampling tests (they are scheduled per file).
"""

import jax
import pytest

from eesd_jax import control, eesd, model
from tests.test_eesd_sampling import CFG, P_VALUE, SAMPLING, chi_square_p, eesd_counts, exact_distribution


@pytest.fixture(scope="module")
def params():
    return model.init_params(CFG, jax.random.key(42), scale=0.35)


@pytest.mark.slow
def test_eesd_sampling_with_thompson_control(params):
    sc = SAMPLING[0]
    ecfg = eesd.EESDConfig(exit_layer=2, max_draft=3, controller=control.ControllerConfig("beta-ts"))
    assert chi_square_p(eesd_counts(params, sc, ecfg), exact_distribution(params, sc)) > P_VALUE


@pytest.mark.parametrize("kind", [k for k in control.KINDS if k not in ("fixed", "beta-ts")])
@pytest.mark.slow
def test_eesd_sampling_with_every_policy(params, kind):
    """Every other registered policy keeps the distribution too (one sampling config each)."""
    sc = SAMPLING[0]
    ecfg = eesd.EESDConfig(exit_layer=1, max_draft=2, controller=control.ControllerConfig(kind))
    assert chi_square_p(eesd_counts(params, sc, ecfg), exact_distribution(params, sc)) > P_VALUE
