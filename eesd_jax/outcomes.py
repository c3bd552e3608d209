"""Verification outcomes of real decoding: what each draft looked like and whether the LLM kept it.

An EESD run with EESDConfig(trace=True) records every round (eesd.RoundTrace). Here each
drafted token becomes one sample (its features, its draft position, accepted or not) for
fitting draft-stop policies (the gate) and for acceptance by draft position. A draft is a
sample only if every draft before it in its round was accepted: after a rejection the
LLM's verdict on it says nothing (its prefix was wrong), and a stop decision is only ever
worth making on a prefix that still stands.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from eesd_jax import chain, eesd


@dataclasses.dataclass
class Drafts:
    """n verified drafts whose round prefix was accepted (see the module docstring)."""

    features: np.ndarray  # [n, len(chain.TRACED)] float32, in chain.TRACED order.
    position: np.ndarray  # [n] int: 0-based draft position in its round (i in DraftFeatures.step).
    accepted: np.ndarray  # [n] bool: the LLM kept it.
    row: np.ndarray  # [n] int: the run (generation) and batch row it came from, numbered in order.

    def feature(self, name: str) -> np.ndarray:
        return self.features[:, chain.TRACED.index(name)]


def drafts(traces: list[eesd.RoundTrace], rounds: list) -> Drafts:
    """The judged drafts of several runs: traces[g] (host copies, Generation.trace) ran rounds[g] [B] rounds."""
    parts, first_row = [], 0
    for t, rounds_b in zip(traces, rounds, strict=True):
        B, R, J, _ = t.features.shape
        r_ok = np.arange(R)[None, :] < np.asarray(rounds_b)[:, None]  # [B, R] rounds that ran.
        j = np.arange(J)[None, None, :]
        n_draft, n_acc = t.n_draft[..., None], t.n_accepted[..., None]
        judged = r_ok[..., None] & (j < n_draft) & (j <= n_acc)  # [B, R, J]
        b, r, k = np.nonzero(judged)
        parts.append((t.features[b, r, k], k, k < t.n_accepted[b, r], b + first_row))
        first_row += B
    if not parts:
        raise ValueError("drafts needs at least one traced run")
    return Drafts(*(np.concatenate(a) for a in zip(*parts, strict=True)))


def acceptance_by_position(d: Drafts, max_draft: int) -> list[dict]:
    """Per draft position 1..J: drafts judged there, accepted, and the rate (accepted given the prefix stood)."""
    out = []
    for i in range(max_draft):
        at = d.position == i
        n, kept = int(at.sum()), int(d.accepted[at].sum())
        out.append({"position": i + 1, "judged": n, "accepted": kept, "rate": round(kept / n, 4) if n else None})
    return out
