"""The distillation data on disk (shards.py): exact round trips, resuming after a stop, the streamed
training order (per-process rows, resumable at a step) and reading without holding the set in RAM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from eesd_jax import configs, distill_data, generate, losses, shards


@pytest.fixture(scope="module")
def whole(lm, tmp_path_factory):
    """The tiny config's data, made without a stop."""
    data_dir = tmp_path_factory.mktemp("whole")
    distill_data.prepare_data(lm, configs.load_config("tiny"), data_dir, progress=False)
    return data_dir


def files(data_dir) -> dict[str, bytes]:
    """Every shard file's bytes, by path."""
    root = data_dir / shards.SHARDS
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.npy"))}


def test_shard_columns_round_trip_exactly(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    columns = {
        "tokens": rng.integers(0, 50_000, 100).astype(np.int32),
        "hidden_N1": rng.standard_normal((100, 8)).astype(np.float16),
        "prompt_ids": np.array(["chat/1", "HumanEval/0"]),
    }
    (tmp_path / shards.SHARDS / ".00003.p0.tmp").mkdir(parents=True)  # As a stop mid-write leaves it.
    shards.write_shard(tmp_path, 3, columns)
    shards.add_columns(tmp_path, 3, {"topk_logp": -rng.random((100, 4)).astype(np.float16)})
    assert shards.complete(tmp_path) == [3]
    assert sorted(p.name for p in (tmp_path / shards.SHARDS).iterdir()) == ["00003"]  # The temporary folder went.
    for name, want in columns.items():
        got = shards.read(tmp_path, 3, name)
        assert isinstance(got, np.memmap) and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert shards.read(tmp_path, 3, "topk_logp").dtype == np.float16
    # Another process making the same data writes the shard too: the first copy stays, the second is dropped.
    monkeypatch.setattr(shards.jax, "process_index", lambda: 1)
    shards.write_shard(tmp_path, 3, {"tokens": columns["tokens"]})
    assert sorted(p.name for p in (tmp_path / shards.SHARDS).iterdir()) == ["00003"]
    assert (shards.shard_dir(tmp_path, 3) / "prompt_ids.npy").is_file()
    with pytest.raises(FileNotFoundError, match="did not store hidden_N2"):
        shards.read(tmp_path, 3, "hidden_N2")


class Stop(Exception):
    pass


def stop_on_call(monkeypatch, module, name, n):
    """module.name raises Stop on its n-th call (as if the run were killed there); returns the call count."""
    real, calls = getattr(module, name), []

    def wrapped(*args, **kw):
        calls.append(1)
        if len(calls) == n:
            raise Stop
        return real(*args, **kw)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_a_stopped_generation_and_teacher_pass_resume_to_the_same_data(lm, whole, tmp_path, monkeypatch):
    config = configs.load_config("tiny")

    part = tmp_path / "stopped"
    with monkeypatch.context() as m:  # Killed while generating the second shard.
        stop_on_call(m, generate, "generate_ar", 2)
        with pytest.raises(Stop):
            distill_data.prepare_data(lm, config, part, progress=False)
    assert shards.complete(part) == [0] and not distill_data.read_manifest(part)["complete"]
    with pytest.raises(ValueError, match="no complete distillation data"):
        distill_data.load_data(part, 1)
    with monkeypatch.context() as m:  # Resumed, then killed in the teacher pass of the second shard.
        generated = stop_on_call(m, generate, "generate_ar", 0)
        stop_on_call(m, distill_data, "run_teacher", 2)
        with pytest.raises(Stop):
            distill_data.prepare_data(lm, config, part, progress=False)
    assert len(generated) == 1  # Only the missing shard's batch was generated again.
    assert shards.has_column(part, 0, "topk_logp") and not shards.has_column(part, 1, "topk_logp")
    with monkeypatch.context() as m:
        taught = stop_on_call(m, distill_data, "run_teacher", 0)
        manifest = distill_data.prepare_data(lm, config, part, progress=False)
    assert (
        len(taught) == 1 and manifest["complete"] and manifest["counts"] == distill_data.read_manifest(whole)["counts"]
    )
    assert files(part) == files(whole)


KILLED = """
import os, signal, sys
import numpy as np
from eesd_jax import configs, distill_data, teacher
real, calls = np.save, []
def save(*args, **kw):  # SIGKILL (no cleanup) in the middle of writing the n-th column.
    calls.append(1)
    if len(calls) == int(sys.argv[2]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kw)
np.save = save
config = configs.load_config("tiny")
distill_data.prepare_data(teacher.load_lm(config.model), config, sys.argv[1], progress=False)
"""


@pytest.mark.parametrize("column", [8, 14])  # 6 columns a generated shard, then 4 a teacher shard.
def test_a_killed_data_run_resumes_to_the_same_data(lm, whole, tmp_path, column):
    """A process killed while writing a shard's columns (the second shard's in generation, a column of the
    first in the teacher pass) leaves only complete shards and columns; running again completes the same data."""
    run = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path), str(column)], capture_output=True, timeout=600)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    in_teacher = column > 12
    assert shards.complete(tmp_path) == ([0, 1] if in_teacher else [0])
    assert distill_data.read_manifest(tmp_path)["complete"] == in_teacher  # Generation done.
    assert shards.has_column(tmp_path, 0, "hidden_N1") == in_teacher and not shards.has_column(tmp_path, 0, "hidden_N2")
    distill_data.prepare_data(lm, configs.load_config("tiny"), tmp_path, progress=False)
    assert files(tmp_path) == files(whole)
    assert not [p for p in (tmp_path / shards.SHARDS).rglob("*") if p.name.endswith(".tmp")]


def test_an_older_data_dir_is_refused_with_one_line(lm, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "eesd_jax.distill_data/1", "spec": {}}))
    with pytest.raises(ValueError, match=r"^\S+ holds distillation data of format .*/1.*: delete it to make it again$"):
        distill_data.prepare_data(lm, configs.load_config("tiny"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="delete it to make it again"):
        distill_data.load_data(tmp_path, 1)


@pytest.mark.parametrize("n_seq,batch", [(10, 4), (12, 6)])
def test_the_stream_partitions_every_global_batch_over_processes(n_seq, batch):
    """Each epoch is a permutation of the sequences (grain's shuffle, a new one per epoch); process p of P takes
    its rows of every global batch: disjoint, together the batch; the same for the same seed, another for another."""
    ids = lambda step, idx: idx  # noqa: E731
    steps = 3 * n_seq // batch
    whole = shards.batch_stream(n_seq, batch, 7, ids, 0, 1)
    slots = np.concatenate([whole[s] for s in range(steps)])
    epochs = slots[: len(slots) // n_seq * n_seq].reshape(-1, n_seq)
    assert all(sorted(e) == list(range(n_seq)) for e in epochs) and len({tuple(e) for e in epochs}) > 1
    for count in (2, 3) if batch % 3 == 0 else (2,):
        for s in range(steps):
            rows = [shards.batch_stream(n_seq, batch, 7, ids, p, count)[s] for p in range(count)]
            assert all(len(r) == batch // count for r in rows)
            np.testing.assert_array_equal(np.concatenate(rows), whole[s])
    again = shards.batch_stream(n_seq, batch, 7, ids, 0, 1)
    assert all(np.array_equal(again[s], whole[s]) for s in range(steps))
    assert any(not np.array_equal(shards.batch_stream(n_seq, batch, 8, ids, 0, 1)[s], whole[s]) for s in range(steps))
    with pytest.raises(ValueError, match=f"batch_size={batch} must be a multiple of the {batch + 1} processes"):
        shards.batch_stream(n_seq, batch, 7, ids, 0, batch + 1)


def test_the_prefetched_stream_resumes_at_a_step():
    stream = shards.batch_stream(9, 4, 0, lambda step, idx: (step, idx.tolist()), 0, 1)
    full = list(shards.prefetched(stream, 0, 8))
    assert [s for s, _ in full] == list(range(8)) and full == [stream[s] for s in range(8)]
    assert list(shards.prefetched(stream, 5, 8)) == full[5:]


def synthetic(data_dir, n_shards: int, per_shard: int, length: int, d: int, k: int) -> int:
    """A data dir of n_shards shards of per_shard sequences of `length` random positions; returns a shard's
    bytes of hidden states."""
    rng = np.random.default_rng(0)
    n = per_shard * length
    for s in range(n_shards):
        shards.write_shard(
            data_dir,
            s,
            {
                "tokens": rng.integers(1, 100, n).astype(np.int32),
                "lengths": np.full(per_shard, length, np.int32),
                "prompt_lens": np.full(per_shard, 4, np.int32),
                "prompt_index": np.arange(s * per_shard, (s + 1) * per_shard, dtype=np.int32),
                "hidden_N1": rng.standard_normal((n, d)).astype(np.float16),
                "topk_logp": -rng.random((n, k)).astype(np.float16),
                "topk_ids": rng.integers(0, 100, (n, k)).astype(np.int32),
            },
        )
    (data_dir / "manifest.json").write_text(json.dumps({"format": distill_data.DATA_FORMAT, "complete": True}))
    return n * d * 2


def test_reading_and_streaming_hold_less_than_a_shard(tmp_path):
    """load_data and a pass of training batches over 4 shards allocate less than one shard's hidden states:
    the positions stay on disk until a batch slices them out."""
    shard_bytes = synthetic(tmp_path, n_shards=4, per_shard=100, length=64, d=256, k=8)
    tracemalloc.start()
    try:
        data, val = distill_data.load_data(tmp_path, 1).split(5)
        make = lambda step, idx: losses.make_batch(data, idx, 64, 64)  # noqa: E731
        stream = shards.batch_stream(data.n_seq, 2, 0, make, 0, 1)
        seen = [b.hidden.shape for b in shards.prefetched(stream, 0, data.n_seq // 2)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data.n_seq + val.n_seq == 400 and seen == [(2, 64, 256)] * (data.n_seq // 2)
    assert all(isinstance(a, np.memmap) for p in data.parts for a in p.values())
    assert peak < shard_bytes, (peak, shard_bytes)
