"""Stack-distance histograms for the one-pass LRU and OPT curves, compiled.

The stack updates (sim/mrc.py explains them) are short integer loops that
Python runs at ~10^7 simple steps per second, far from the <= 5 s a 1M-lookup
curve should take. This module compiles the same two loops with cffi (at run
time into the user cache directory, once) and falls back to the pure-Python
versions in `sim.mrc` when no C compiler is available. Tests hold both
against per-size replay of the core.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

CDEF = """
int mer_lru_hist(const int32_t *flat, int64_t n_steps, int k, int32_t n_keys,
                 int64_t *hist, int64_t cap);
int mer_opt_hist(const int32_t *flat, const int64_t *nval, int64_t n_steps, int k,
                 int32_t n_keys, int64_t *hist, int64_t cap);
"""

C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BIG ((int64_t)1 << 62)

/* LRU over steps: depth of each lookup at step start, then the step's keys go
   on top in rank order (rank 0 on top). hist[min(depth, cap)]++ for reused keys. */
int mer_lru_hist(const int32_t *flat, int64_t n_steps, int k, int32_t n_keys,
                 int64_t *hist, int64_t cap) {
    int32_t *stack = malloc(sizeof(int32_t) * (n_keys + 1));
    int32_t *tmp = malloc(sizeof(int32_t) * (n_keys + 1));
    uint8_t *seen = calloc(n_keys, 1);
    int64_t *mark = malloc(sizeof(int64_t) * n_keys);
    if (!stack || !tmp || !seen || !mark) return -1;
    for (int32_t i = 0; i < n_keys; i++) mark[i] = -1;
    int64_t len = 0;
    for (int64_t t = 0; t < n_steps; t++) {
        const int32_t *keys = flat + t * k;
        int64_t maxd = -1;
        for (int r = 0; r < k; r++) {
            int32_t key = keys[r];
            mark[key] = t;
            if (seen[key]) {
                int64_t d = 0;
                while (stack[d] != key) d++;
                hist[d < cap ? d : cap]++;
                if (d > maxd) maxd = d;
            }
        }
        int64_t n = 0;
        for (int r = 0; r < k; r++) tmp[n++] = keys[r];
        for (int64_t i = 0; i < len; i++)
            if (mark[stack[i]] != t) tmp[n++] = stack[i];
        for (int r = 0; r < k; r++) if (!seen[keys[r]]) { seen[keys[r]] = 1; len++; }
        int32_t *sw = stack; stack = tmp; tmp = sw;
        (void)maxd;
    }
    free(stack); free(tmp); free(seen); free(mark);
    return 0;
}

/* OPT over steps (Mattson's stack generalised to k keys per step, see sim/mrc.py). */
int mer_opt_hist(const int32_t *flat, const int64_t *nval, int64_t n_steps, int k,
                 int32_t n_keys, int64_t *hist, int64_t cap) {
    int32_t *stack = malloc(sizeof(int32_t) * (n_keys + 1));
    int32_t *tmp = malloc(sizeof(int32_t) * (n_keys + 1));
    uint8_t *seen = calloc(n_keys, 1);
    int64_t *mark = malloc(sizeof(int64_t) * n_keys);
    int64_t *val = malloc(sizeof(int64_t) * n_keys);
    int64_t *depth = malloc(sizeof(int64_t) * k);
    int64_t *drops = malloc(sizeof(int64_t) * k);
    int32_t *pool = malloc(sizeof(int32_t) * (k + 2));
    if (!stack || !tmp || !seen || !mark || !val || !depth || !drops || !pool) return -1;
    for (int32_t i = 0; i < n_keys; i++) mark[i] = -1;
    int64_t len = 0;
    for (int64_t t = 0; t < n_steps; t++) {
        const int32_t *keys = flat + t * k;
        int m = 0, nd = 0;
        int64_t maxd = -1;
        for (int r = 0; r < k; r++) {
            int32_t key = keys[r];
            mark[key] = t;
            val[key] = nval[t * k + r];
            if (seen[key]) {
                int64_t d = 0;
                while (stack[d] != key) d++;
                hist[d < cap ? d : cap]++;
                depth[r] = d;
                if (d > maxd) maxd = d;
                if (d >= k) {
                    m++;
                    /* insertion sort of the drop points d - k + 1 */
                    int64_t v = d - k + 1;
                    int i = nd++;
                    while (i > 0 && drops[i - 1] > v) { drops[i] = drops[i - 1]; i--; }
                    drops[i] = v;
                }
            } else {
                depth[r] = BIG;
                m++;
            }
        }
        int64_t n = 0;
        for (int r = 0; r < k; r++) tmp[n++] = keys[r];
        int64_t i = 0;
        if (m > 0) {
            int np = 0;
            while (np < m && i < len) {
                int32_t x = stack[i++];
                if (mark[x] != t) pool[np++] = x;
            }
            int64_t j = 0;
            int di = 0;
            for (;;) {
                int m_next;
                if (di < nd && drops[di] == j + 1) { m_next = m - 1; di++; }
                else {
                    m_next = m;
                    while (i < len) {
                        int32_t x = stack[i++];
                        if (mark[x] != t) { pool[np++] = x; break; }
                    }
                }
                if (np == 0) break;
                int best = 0;
                for (int q = 1; q < np; q++) if (val[pool[q]] < val[pool[best]]) best = q;
                tmp[n++] = pool[best];
                pool[best] = pool[--np];
                m = m_next;
                j++;
                if (m == 0 && np == 0) break;
            }
        }
        for (; i < len; i++) if (mark[stack[i]] != t) tmp[n++] = stack[i];
        for (int r = 0; r < k; r++) if (!seen[keys[r]]) { seen[keys[r]] = 1; len++; }
        int32_t *sw = stack; stack = tmp; tmp = sw;
        (void)maxd; (void)n;
    }
    free(stack); free(tmp); free(seen); free(mark); free(val); free(depth); free(drops);
    free(pool);
    return 0;
}
"""

_MODULE: ModuleType | None = None
_TRIED = False


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "mer" / "stackdist"


def load() -> ModuleType | None:
    """The compiled module, building it once into the user cache; None if impossible."""
    global _MODULE, _TRIED
    if _TRIED:
        return _MODULE
    _TRIED = True
    if os.environ.get("MER_NO_C_KERNELS"):
        return None
    try:
        from cffi import FFI

        digest = hashlib.sha256((CDEF + C_SOURCE + sys.version).encode()).hexdigest()[:12]
        name = f"_mer_stackdist_{digest}"
        out_dir = _cache_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        found = list(out_dir.glob(f"{name}*.so"))
        if not found:
            ffi = FFI()
            ffi.cdef(CDEF)
            ffi.set_source(name, C_SOURCE, extra_compile_args=["-O2"])
            with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                built = Path(ffi.compile(tmpdir=tmp, verbose=False))
                dest = out_dir / built.name
                os.replace(built, dest)  # atomic: concurrent builders never see half a file
            found = [dest]
        spec = importlib.util.spec_from_file_location(name, found[0])
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _MODULE = mod
    except Exception:  # no compiler, no headers, read-only home: use Python
        _MODULE = None
    return _MODULE


def _ptr(mod: Any, ctype: str, arr: np.ndarray) -> Any:
    return mod.ffi.cast(ctype, mod.ffi.from_buffer(arr))


def lru_hist(steps: np.ndarray, cap: int) -> np.ndarray | None:
    """hist[d] = lookups at stack depth d (d >= cap folded into cap); None without C."""
    mod = load()
    if mod is None:
        return None
    steps = np.ascontiguousarray(steps, dtype=np.int32)
    n_keys = int(steps.max()) + 1 if steps.size else 1
    hist = np.zeros(cap + 1, dtype=np.int64)
    rc = mod.lib.mer_lru_hist(
        _ptr(mod, "int32_t *", steps),
        len(steps),
        steps.shape[1],
        n_keys,
        _ptr(mod, "int64_t *", hist),
        cap,
    )
    if rc != 0:
        raise MemoryError("mer_lru_hist: out of memory")
    return hist


def opt_hist(steps: np.ndarray, nval: np.ndarray, cap: int) -> np.ndarray | None:
    """Like `lru_hist` for the OPT stack; `nval` orders keys by next use (see sim.mrc)."""
    mod = load()
    if mod is None:
        return None
    steps = np.ascontiguousarray(steps, dtype=np.int32)
    nval = np.ascontiguousarray(nval, dtype=np.int64)
    n_keys = int(steps.max()) + 1 if steps.size else 1
    hist = np.zeros(cap + 1, dtype=np.int64)
    rc = mod.lib.mer_opt_hist(
        _ptr(mod, "int32_t *", steps),
        _ptr(mod, "int64_t *", nval),
        len(steps),
        steps.shape[1],
        n_keys,
        _ptr(mod, "int64_t *", hist),
        cap,
    )
    if rc != 0:
        raise MemoryError("mer_opt_hist: out of memory")
    return hist
