"""Prefetch accounting and rules: every prefetch's fate, the speculative budget, reclaim,
and the co-occurrence predictor against a brute-force naive Bayes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mer.core import Replay, ReplayConfig, ReplayContext, make_predictor
from mer.summary import prefetch_figures

L, E, K = 3, 5, 2


def _steps(seed, n_tokens=30):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(E, 0.5))
    return np.asarray(
        [
            [layer * E + int(e) for e in rng.choice(E, K, replace=False, p=p)]
            for _ in range(n_tokens)
            for layer in range(L)
        ],
        dtype=np.int32,
    )


def _drive(rep, steps, lag=1):
    """Demand reads land at once, prefetches `lag` steps later. Returns, per prefetch,
    what happened to it, tracked here from the admissions alone."""
    fate = {}  # key -> "pending" | "landed" while speculative
    outcome = {"used": 0, "late": 0, "wasted": 0}
    landing: dict[int, list[int]] = {}
    resident = set()
    for t in range(len(steps)):
        for key in landing.pop(t, []):
            if key in fate and fate[key] == "pending":
                fate[key] = "landed"
            rep.complete(key)
            resident.add(key)
        res = rep.step(t)
        for key in res.cancelled:  # dropped at its step: a wasted prefetch, never landing
            assert key in fate and key not in res.keys
            outcome["wasted"] += 1
            del fate[key]
            for keys in landing.values():
                if key in keys:
                    keys.remove(key)
        for key, h, late in zip(res.keys, res.hit, res.late, strict=True):
            if key in fate:
                outcome["used" if h else "late"] += 1 if (h or late) else 0
                if h or late:
                    del fate[key]
        for a in res.reads:
            if a.evicted is not None:
                if a.evicted in fate:
                    outcome["wasted"] += 1
                    del fate[a.evicted]
                resident.discard(a.evicted)
            rep.complete(a.key)
            resident.add(a.key)
        for a in rep.prefetch(t):
            if a.evicted is not None and a.evicted in fate:
                outcome["wasted"] += 1
                del fate[a.evicted]
            fate[a.key] = "pending"
            landing.setdefault(t + lag, []).append(a.key)
    return outcome, len(fate)


@pytest.mark.parametrize("slots", [0, 1, 3])
@pytest.mark.parametrize(("reclaim", "cancel"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("predictor", ["markov", "cooccur", "previous-token"])
def test_every_prefetch_ends_one_way(slots, reclaim, cancel, predictor):
    steps = _steps(3)
    cfg = ReplayConfig(
        policy="lru",
        cache_slots=5,
        predictor=predictor,
        pipeline_depth=2,
        prefetch_slots=slots,
        prefetch_reclaim=reclaim,
        prefetch_cancel=1024 if cancel else 0,
    )
    rep = Replay(steps, n_layers=L, n_experts=E, config=cfg)
    outcome, left = _drive(rep, steps)
    pf = prefetch_figures(rep.stats, bytes_per_read=100)
    assert pf["issued"] > 0
    assert pf["used"] == outcome["used"]
    assert pf["late"] == outcome["late"]
    assert pf["issued"] == pf["used"] + pf["late"] + pf["wasted"] + pf["unused"]
    assert pf["precision"] == pytest.approx((pf["used"] + pf["late"]) / pf["issued"])
    need = pf["used"] + rep.stats.total("misses")
    assert pf["recall"] == pytest.approx((pf["used"] + pf["late"]) / need)
    assert pf["wasted_bytes"] == 100 * pf["wasted"]
    assert pf["wasted"] == outcome["wasted"] and pf["unused"] == left
    if not cancel:
        assert pf["cancelled"] == 0


@pytest.mark.parametrize("landed", [False, True])
def test_cancel_drops_a_guess_its_step_routed_without(landed):
    # layer 0 only; key 3 is prefetched for step 1, which routes 0 and 1
    steps = np.asarray([[0, 1], [0, 1], [2, 4]], dtype=np.int32)
    cfg = ReplayConfig(policy="lru", cache_slots=3, prefetch_cancel=1024)
    rep = Replay(steps, n_layers=1, n_experts=5, config=cfg)
    for a in rep.step(0).reads:
        rep.complete(a.key)
    adm = rep.cache.prefetch(3, protect=[0, 1], target=1)
    assert adm is not None and adm.evicted is None
    if landed:
        rep.complete(3)
    res = rep.step(1)
    assert res.cancelled == (3,) and res.n_hits == 2
    assert 3 not in rep.cache.state and rep.cache.n_inflight_prefetch == 0
    rep.complete(3)  # a read that lands after it was dropped changes nothing
    assert 3 not in rep.cache.state
    res = rep.step(2)  # two misses: the first takes the dropped guess's slot, no eviction
    assert res.reads[0].evicted is None and res.reads[1].evicted in (0, 1)
    assert res.reads[0].slot == adm.slot
    st = rep.stats
    assert st.total("prefetch_wasted") == st.total("prefetch_cancelled") == 1
    assert st.total("evictions") == 2  # the dropped guess, then LRU's victim


def test_cancel_keeps_a_guess_read_from_longer_ago_than_its_window():
    # key 3 is read at step 0 for step 2; with a window of 1 step it has landed by then
    # (older than the window) and stays, a wasted read only if it is evicted later
    steps = np.asarray([[0, 1], [0, 1], [0, 1], [2, 4]], dtype=np.int32)
    for window, dropped in ((1, ()), (2, (3,))):
        cfg = ReplayConfig(policy="lru", cache_slots=3, prefetch_cancel=window)
        rep = Replay(steps, n_layers=1, n_experts=5, config=cfg)
        for a in rep.step(0).reads:
            rep.complete(a.key)
        assert rep.cache.prefetch(3, protect=[0, 1], target=2) is not None
        rep.step(1)
        assert rep.step(2).cancelled == dropped
        assert (3 in rep.cache.state) == (not dropped)


def _cancel_run(steps, cfg, lag):
    """Prefetches land `lag` steps after issue (0: at once); per step, the prefetches
    issued and the guesses cancelled."""
    rep = Replay(steps, n_layers=L, n_experts=E, config=cfg)
    landing: dict[int, list[int]] = {}
    log = []
    for t in range(len(steps)):
        for key in landing.pop(t, []):
            rep.complete(key)
        res = rep.step(t)
        for a in res.reads:
            rep.complete(a.key)
        for keys in landing.values():
            for key in res.cancelled:
                if key in keys:
                    keys.remove(key)
        issued = []
        for a in rep.prefetch(t):
            issued.append(a.key)
            if lag == 0:
                rep.complete(a.key)
            else:
                landing.setdefault(t + lag, []).append(a.key)
        log.append((tuple(issued), res.cancelled))
    return log, rep.stats


@pytest.mark.parametrize("predictor", ["markov", "cooccur"])
def test_cancel_decisions_do_not_depend_on_when_reads_land(predictor):
    """What is prefetched and cancelled is a function of the trace and the cache's
    decisions: with no in-flight cap binding and an LRU whose victims are never the
    reads still in flight, every landing time gives the same decisions step by step;
    timing only moves used prefetches to late."""
    steps = _steps(11, 40)
    cfg = ReplayConfig(
        policy="lru",
        cache_slots=9,
        predictor=predictor,
        pipeline_depth=3,
        prefetch_lead=2,
        prefetch_top_n=1,
        prefetch_inflight=1000,
        prefetch_cancel=1024,
    )
    ref, ref_st = _cancel_run(steps, cfg, 0)
    assert ref_st.total("prefetch_cancelled") > 0
    assert ref_st.total("late") == 0
    for lag in (1, 2, 4):
        log, st = _cancel_run(steps, cfg, lag)
        assert log == ref
        for name in ("prefetch_issued", "prefetch_wasted", "prefetch_cancelled", "misses"):
            if name == "misses":
                assert st.total(name) - st.total("late") == ref_st.total(name)
            else:
                assert st.total(name) == ref_st.total(name), name


def test_the_budget_bounds_the_guesses_in_the_cache():
    steps = _steps(5, 40)
    for budget in (1, 2):
        cfg = ReplayConfig(
            policy="lru",
            cache_slots=9,
            predictor="popularity",
            pipeline_depth=3,
            prefetch_top_n=3,
            prefetch_slots=budget,
        )
        rep = Replay(steps, n_layers=L, n_experts=E, config=cfg)
        for t in range(len(steps)):
            res = rep.step(t)
            for a in res.reads:
                rep.complete(a.key)
            for a in rep.prefetch(t):
                rep.complete(a.key)
            assert len(rep.cache.spec) <= budget
            assert all(rep.cache.is_resident(k) for k in rep.cache.spec)


def test_reclaim_evicts_a_guess_its_step_did_not_use_first():
    # layer 0 only; the step after a prefetch of key 3 (predicted for step 1) uses 0 and 1
    steps = np.asarray([[0, 1], [0, 1], [2, 4]], dtype=np.int32)
    cfg = ReplayConfig(policy="lru", cache_slots=3, prefetch_reclaim=True)
    rep = Replay(steps, n_layers=1, n_experts=5, config=cfg)
    for a in rep.step(0).reads:
        rep.complete(a.key)
    adm = rep.cache.prefetch(3, protect=[0, 1], target=1)
    assert adm is not None
    rep.complete(3)
    rep.step(1)  # 0 and 1 hit; 3 was predicted for step 1 and not used: proven wrong
    assert 3 in rep.cache.useless
    res = rep.step(2)  # two misses: the wrong guess goes first, then LRU's victim
    assert res.reads[0].evicted == 3
    assert rep.stats.total("prefetch_wasted") == 1


def _brute_cooccur(steps, t, u, beta=0.3, beta_prev=0.3, a=0.5):
    """z of every expert of step u's layer, recomputed from whole tokens before t's."""
    nk = L * E
    tokens = steps.reshape(-1, L, K)
    tau = t // L
    done = tokens[:tau]
    ind = np.zeros((len(done), nk))
    for i, tok in enumerate(done):
        ind[i, tok.reshape(-1)] = 1
    T = len(done)
    cur = np.zeros(nk)
    cur[tokens[tau, : t % L + 1].reshape(-1)] = 1
    seen = [j * E + e for j in range(t % L + 1) for e in range(E)]
    layer = u % L
    out = []
    for e in range(E):
        y = layer * E + e
        n_y = ind[:, y].sum()
        prior = (n_y + a) / (T + 2 * a)
        z = math.log(prior / (1 - prior))
        same = u // L == tau
        if same:
            ev = 0.0
            for x in seen:
                c = (ind[:, x] * ind[:, y]).sum()
                n_x = ind[:, x].sum()
                p1 = (c + a) / (n_y + 2 * a)
                p0 = (n_x - c + a) / (T - n_y + 2 * a)
                ev += math.log(p1 / p0) if cur[x] else math.log((1 - p1) / (1 - p0))
            z += beta * ev
        # the previous token's evidence (for u in this token) or this token's (for the next)
        prev = tokens[tau - 1].reshape(-1) if same else tokens[tau, : t % L + 1].reshape(-1)
        layers = range(L) if same else range(t % L + 1)
        if same and tau == 0:
            layers = range(0)
        pairs = [(ind[i], ind[i + 1]) for i in range(T - 1)]
        Tp = len(pairs)
        n_next = sum(q[y] for _, q in pairs)
        ev = 0.0
        prev_set = set(int(k) for k in prev)
        for j in layers:
            for ee in range(E):
                x = j * E + ee
                c = sum(p[x] * q[y] for p, q in pairs)
                n_x = sum(p[x] for p, _ in pairs)
                q1 = (c + a) / (n_next + 2 * a)
                q0 = (n_x - c + a) / (Tp - n_next + 2 * a)
                ev += math.log(q1 / q0) if x in prev_set else math.log((1 - q1) / (1 - q0))
        z += beta_prev * ev
        out.append(z)
    return np.asarray(out)


def test_cooccur_scores_are_naive_bayes_over_the_token_so_far():
    steps = _steps(9, 12)
    ctx = ReplayContext(L, E, K, steps)
    pred = make_predictor("cooccur", ctx)
    checked = 0
    for t in range(len(steps) - 3):
        pred.observe(t, steps[t])
        if t < 2 * L:
            continue
        ranked_all = pred.predict(t, 3)
        for d, ranked in enumerate(ranked_all, 1):
            u = t + d
            want = _brute_cooccur(steps, t, u)
            np.testing.assert_allclose(pred.log_odds(t, u), want, rtol=1e-9, atol=1e-9)
            probs = [p for _, p in ranked]
            assert probs == sorted(probs, reverse=True)
            assert all(0.0 <= p <= 1.0 for p in probs)
            checked += 1
    assert checked > 10


def test_lead_skips_the_steps_too_close_to_land_in_time():
    from mer.core.replay import auto_lead

    assert auto_lead(0.033, 0.0093) == 4  # nvme-desktop: 33 ms reads, 9.3 ms steps
    assert auto_lead(0.001, 0.01) == 1
    steps = _steps(4, 20)
    for lead in (1, 2, 3):
        cfg = ReplayConfig(
            policy="lru",
            cache_slots=6,
            predictor="oracle",
            pipeline_depth=3,
            prefetch_top_n=K,
            prefetch_lead=lead,
        )
        rep = Replay(steps, n_layers=L, n_experts=E, config=cfg)
        for t in range(len(steps) - 3):
            for a in rep.step(t).reads:
                rep.complete(a.key)
            for a in rep.prefetch(t):
                u = rep.cache.spec[a.key]
                assert t + lead <= u <= t + 3
                assert a.key in steps[u]


@pytest.mark.parametrize("hold", [0, 1, 2, 3])
@pytest.mark.parametrize("inflight", [1, 2])
def test_hold_frees_a_guess_after_the_steps_its_read_takes(hold, inflight):
    """--prefetch-hold N: a guess stops counting against --prefetch-inflight N steps after
    it was issued, or when it is looked up or evicted, whichever comes first (0: no cap
    in steps). The outstanding guesses and the keys wanted are tracked here from the trace
    and the admissions alone; the oracle wants each step's keys from `lead` steps ahead on,
    in rank order."""
    steps = _steps(5, 20)
    depth, lead, n = 4, 3, len(steps)
    cfg = ReplayConfig(
        policy="lru",
        cache_slots=12,
        predictor="oracle",
        pipeline_depth=depth,
        prefetch_top_n=K,
        prefetch_inflight=inflight,
        prefetch_lead=lead,
        prefetch_hold=hold,
    )
    rep = Replay(steps, n_layers=L, n_experts=E, config=cfg)
    issued: dict[int, tuple[int, int]] = {}  # key -> (issued at, aimed at)
    total = 0
    for t in range(n):
        res = rep.step(t)
        for key in res.keys:
            issued.pop(key, None)  # looked up: used (or it was never a guess)
        for a in res.reads:
            issued.pop(a.evicted, None)
        outstanding = [k for k, (s, u) in issued.items() if u > t and (hold == 0 or t - s < hold)]
        wanted: list[int] = []
        for u in range(t + lead, min(n, t + depth + 1)):
            wanted += [int(k) for k in steps[u] if int(k) not in wanted]
        fresh = [k for k in wanted if k not in rep.cache.state]
        expect = fresh[: max(0, inflight - len(outstanding))]
        got = rep.prefetch(t)
        assert [a.key for a in got] == expect, (t, outstanding)
        for a in got:
            issued.pop(a.evicted, None)
            u = next(u for u in range(t + 1, n) if a.key in steps[u])
            issued[a.key] = (t, u)
        total += len(got)
    assert total > 0


@pytest.mark.parametrize("window", [0, 1, 2, 3])
@pytest.mark.parametrize("seed", range(6))
def test_window_reads_the_most_probable_of_the_nearest_layers_first(window, seed):
    """--prefetch-window W: the guesses for the steps lead .. lead + W - 1 come most
    probable first (ties: nearer step, then the predictor's rank), then the others by
    step and rank; each key once, at its first place. Rebuilt here as one sort over the
    candidates' keys (window, -prob or step, step, rank) from hand-made predictions."""
    rng = np.random.default_rng(seed)
    depth, lead, top_n, min_prob = 6, 2, 2, 0.3
    cfg = ReplayConfig(
        policy="lru",
        cache_slots=6,
        predictor="popularity",
        pipeline_depth=depth,
        prefetch_top_n=top_n,
        prefetch_min_prob=min_prob,
        prefetch_lead=lead,
        prefetch_window=window,
    )
    rep = Replay(_steps(seed, 6), n_layers=L, n_experts=E, config=cfg)
    t = 4
    preds = []
    for d in range(1, depth + 1):
        layer = (t + d) % L
        keys = rng.permutation(E)[:4] + layer * E
        probs = np.sort(rng.choice([0.2, 0.35, 0.5, 0.8, 0.9], 4))[::-1]  # ties on purpose
        preds.append([(int(k), float(p)) for k, p in zip(keys, probs, strict=True)])
    cands = []
    for d, pred in enumerate(preds, 1):
        for r, (k, p) in enumerate(pred):
            if d >= lead and r < top_n and all(q >= min_prob for _, q in pred[: r + 1]):
                near = d < lead + window
                cands.append(((0, -p, d, r) if near else (1, 0.0, d, r), k, t + d))
    cands.sort()
    want_keys, want_target = [], {}
    for _, k, u in cands:
        if k not in want_target:
            want_keys.append(k)
            want_target[k] = u
    got_keys, got_target = rep.proposals(t, preds)
    assert got_keys == want_keys
    assert got_target == want_target
