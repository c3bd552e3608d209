"""Results files record what they were measured with."""

import subprocess

import jax

from eesd_jax import provenance


def test_record_names_versions_commit_device_and_seeds():
    rec = provenance.record(data_seed=3)
    assert rec["versions"]["jax"] == jax.__version__ and rec["versions"]["flax"]
    assert rec["device"]["platform"] == jax.devices()[0].platform and rec["device"]["count"] == jax.device_count()
    assert rec["seeds"] == {"data_seed": 3}
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if head:  # A checkout: the commit is HEAD's, "+dirty" when tracked files changed.
        assert rec["commit"].split("+")[0] == head


def test_commit_outside_a_checkout_is_none(tmp_path):
    assert provenance.git_commit(tmp_path) is None
