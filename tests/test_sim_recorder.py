"""When the simulated driver sees each read land (`_Recorder.observed`).

The recorder keeps an FFN's polls as one entry (start, end, period) instead of one
entry per poll. The reference here expands every poll into its own instant and
scans for the first reap at or after each read's end, as the driver does.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from mer.sim.model import _Recorder


def _brute(events, finishes):
    """Every reap instant as a window (a, b), in order; the first with b >= f."""
    reaps = []
    for kind, a, b, poll in events:
        if kind == "look":
            reaps.append((a, b))
        else:  # an FFN on the hand-off path: at its start, every poll, at its end
            reaps.append((a, a))
            if poll:
                reaps.extend((x, x) for x in range(a + poll, b, poll))
            reaps.append((b, b))
    out = []
    for f in finishes:
        hit = next(((a, b) for a, b in reaps if b >= f), None)
        out.append(f if hit is None else max(hit[0], f))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_observed_equals_every_poll_expanded(seed):
    rng = random.Random(seed)
    rec = _Recorder(observe=True)
    events, now = [], 0
    for _ in range(rng.randint(1, 30)):
        now += rng.choice([0, 0, 1, 3, 10, 57])
        kind = rng.choice(["look", "window", "ffn", "ffn"])
        if kind == "look":
            events.append(("look", now, now, 0))
            rec.look(now)
        elif kind == "window":
            end = now + rng.randint(0, 40)
            events.append(("look", now, end, 0))
            rec.look(now, end)
            now = end
        else:
            end = now + rng.randint(0, 60)
            poll = rng.choice([0, 1, 4, 7, 25, 100])
            events.append(("ffn", now, end, poll))
            rec.ffn(now, end, True, poll)
            now = end
    finishes = [rng.randint(-5, now + 20) for _ in range(60)]
    finishes += [a + d for _, a, b, _ in events for d in (-1, 0, 1)]  # ties at every edge
    rec.finish = [SimpleNamespace(finish=f) for f in finishes]
    assert rec.observed().tolist() == _brute(events, finishes)


def test_an_idle_ffn_records_no_polls():
    rec = _Recorder(observe=True)
    rec.ffn(0, 100, False, 10)  # nothing in flight: the direct path reaps nothing
    rec.finish = [SimpleNamespace(finish=5)]
    assert rec.observed().tolist() == [5]
    assert np.asarray(rec.obs_b).size == 0
