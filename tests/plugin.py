"""The suite's tiers, as a pytest plugin (conftest.py loads it):

* fast (`make test-fast`, `pytest -m "not slow"`): unit tests on tiny configs;
* slow: tests that use the bundled SmolLM2 (marked here when they use its fixtures) or run long;
* torch: live comparisons with transformers' PyTorch models. Without --parity they are deselected,
  with a line saying so (the golden fixtures in fixtures/golden stand in), and a test whose own code
  uses torch fails. `pytest --parity` (make parity; CI runs it) runs them too, and fails at once if
  torch is not installed. The live reference on the bundled model is computed in a subprocess
  started as soon as collection selects a test that needs it, so its ~40 s of single-threaded GGUF
  parsing overlaps with the rest of the suite.
"""

from __future__ import annotations

import sys

import pytest
from helpers import SmolLMReference

PARITY_HINT = "run `make parity` (pytest --parity, with the parity extra: torch) to include them"
NO_TORCH = "the everyday suite must not need torch (make test installs none): mark the test torch"
# Fixtures that load the bundled real model: a test using one is real_model and slow.
REAL_MODEL_FIXTURES = {"smollm", "smollm_reference"}

_reference = SmolLMReference()
_DESELECTED_LIVE = pytest.StashKey[int]()


def pytest_addoption(parser):
    parser.addoption(
        "--parity",
        action="store_true",
        help="also run the live comparisons with transformers' PyTorch models (tests marked torch; needs torch)",
    )


def pytest_configure(config):
    if config.getoption("parity"):
        try:
            import torch  # noqa: F401
        except ImportError as e:
            raise pytest.UsageError(f"--parity needs torch: pip install -e '.[test,parity]' ({e})") from None


@pytest.fixture(autouse=True)
def no_torch_without_parity(request):
    """Without --parity, a test whose own code uses torch fails here too, not only where torch is missing.

    Its own code: the test function's names or its module's globals. Libraries may import torch
    lazily when it is installed (transformers does, after `make parity` put it in the venv); that
    is not the test needing it, and where torch is absent they do without.
    """
    own = "torch" in request.function.__code__.co_names or any(
        getattr(v, "__name__", "").partition(".")[0] == "torch" for v in vars(request.module).values()
    )
    if own and not request.config.getoption("parity"):
        pytest.fail(f"this test uses torch; {NO_TORCH}")


def pytest_collection_modifyitems(session, config, items):
    """Mark the tests that use the real model; without --parity, deselect the live comparisons with
    PyTorch (saying so); run real-model tests last, so that the reference subprocess works while the
    fast tests run."""
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)
            item.add_marker(pytest.mark.slow)
    if not config.getoption("parity"):
        live = [item for item in items if item.get_closest_marker("torch")]
        if live:
            items[:] = [item for item in items if not item.get_closest_marker("torch")]
            config.hook.pytest_deselected(items=live)
            config.stash[_DESELECTED_LIVE] = len(live)
    items.sort(key=lambda item: item.get_closest_marker("real_model") is not None)  # Stable sort.


def pytest_report_collectionfinish(config, start_path, items):
    if n := config.stash.get(_DESELECTED_LIVE, 0):
        return f"deselected {n} live PyTorch parity tests (marked torch; golden fixtures stand in): {PARITY_HINT}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if n := config.stash.get(_DESELECTED_LIVE, 0):
        terminalreporter.write_line(f"{n} live PyTorch parity tests deselected: {PARITY_HINT}")


def pytest_collection_finish(session):
    if "torch" in sys.modules and not session.config.getoption("parity"):
        raise pytest.UsageError(f"collecting the tests imported torch; {NO_TORCH}")
    if session.config.option.collectonly:
        return
    if any("smollm_reference" in item.fixturenames for item in session.items):
        _reference.start()


def pytest_unconfigure(config):
    _reference.close()


@pytest.fixture(scope="session")
def smollm_reference() -> dict:
    """transformers on the bundled GGUF, live: prompt ids, [P, V] logits, greedy tokens, eos id."""
    return _reference.result()
