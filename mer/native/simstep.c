/* The simulator's fast engine with prefetch on, one C loop over a whole trace.

   The definitions it restates, and is tested equal to (tests/test_simstep_native.py):
   - the decisions: `ExpertCache.access_step`, `_admit`, `prefetch`, `complete`,
     `_mark_missed`, `_reclaim_victim`, `_step_victim`, `_evict` (mer/core/cache.py)
     and `Replay.prefetch`'s admission loop (mer/core/replay.py), for policies that
     protect the step (the policy hooks are replay.c's, shared with the hit-only
     replays); the predictor's proposals come in precomputed (`w_*`), because no
     built-in predictor reads the cache or the clock;
   - the timing: `AnalyticSSD` (the chunked SSD queue) or `SharedSSD` (reads in flight
     sharing the device), `_ffn_schedule` and the step
     loop of `_run_fast` (mer/sim/model.py), in the same integer ticks.
   Granularity step only; the Python path runs everything else. */

#include "replay.c"
#include "simstep.h"

enum { ABSENT = 0, READY = 1, IN_FLIGHT = 2 };

/* -- an insertion-ordered set over keys (Python's dict order): linked list ---------- */

typedef struct {
    int32_t *prv, *nxt; /* n + 1 nodes; node n is the sentinel; prv[x] < 0: not in */
    int32_t S;
    int64_t n_in;
} oset;

static int oset_init(oset *o, int32_t n) {
    o->prv = malloc(sizeof(int32_t) * (n + 1));
    o->nxt = malloc(sizeof(int32_t) * (n + 1));
    if (!o->prv || !o->nxt) return -1;
    for (int32_t i = 0; i < n; i++) o->prv[i] = o->nxt[i] = -1;
    o->S = n;
    o->prv[n] = o->nxt[n] = n;
    o->n_in = 0;
    return 0;
}
static void oset_free(oset *o) {
    free(o->prv);
    free(o->nxt);
}
static inline int oset_has(const oset *o, int32_t x) { return o->prv[x] >= 0; }
static inline void oset_add(oset *o, int32_t x) {
    if (o->prv[x] >= 0) return;
    l_push(o->prv, o->nxt, o->S, x);
    o->n_in++;
}
static inline void oset_del(oset *o, int32_t x) {
    if (o->prv[x] < 0) return;
    l_unlink(o->prv, o->nxt, x);
    o->prv[x] = o->nxt[x] = -1;
    o->n_in--;
}

/* -- the SSD (AnalyticSSD) ---------------------------------------------------------- */

typedef struct {
    int32_t key;
    int8_t fg, registered;
    int64_t remaining, finish;
    int64_t left; /* chunks not yet served (shared device) */
} Rd;

typedef struct {
    int64_t vf; /* V at which it is served */
    int64_t ri;
} DevChunk;

/* SharedSSD's work units per chunk (sim/model.py SHARE_UNITS) */
#define SHARE_UNITS ((int64_t)1 << 30)

typedef struct {
    int C;
    int64_t m, d, access, lag;
    int64_t *free;
    int64_t shift, last_finish, queued, fg_chunks, fg_finish;
    int64_t *fgq, *bgq; /* read indices; heads advance */
    int64_t fg_h, fg_t, bg_h, bg_t;
    int64_t *done; /* dispatched, not yet reaped (unordered) */
    int64_t n_done;
    Rd *rd;
    int64_t n_rd;
    /* the shared device: W chunks at most in it, a ring from dh of dn chunks */
    int shared;
    int64_t W;
    const int64_t *spans;
    int64_t V, t;
    DevChunk *dev;
    int64_t dh, dn;
    /* its projection (no more issues): per read, and the last landing; scratch */
    int proj_ok;
    int64_t plast;
    int64_t *pfin, *pleft, *pq_ri, *pq_rem;
    DevChunk *pdev;
} SSD;

static inline int64_t ceil_mul_div(int64_t a, int64_t b, int64_t c) {
    return (int64_t)(((__int128)a * b + c - 1) / c);
}
static inline int64_t floor_mul_div(int64_t a, int64_t b, int64_t c) {
    return (int64_t)((__int128)a * b / c);
}

/* SharedSSD._fill: chunks enter from the reader's queue, foreground first */
static void sh_fill(SSD *s) {
    int64_t room = s->W - s->dn;
    const int64_t vf = s->V + SHARE_UNITS;
    for (int q = 0; q < 2 && room; q++) {
        int64_t *qa = q == 0 ? s->fgq : s->bgq;
        int64_t *h = q == 0 ? &s->fg_h : &s->bg_h;
        const int64_t tl = q == 0 ? s->fg_t : s->bg_t;
        while (room && *h < tl) {
            Rd *r = &s->rd[qa[*h]];
            int64_t n = r->remaining < room ? r->remaining : room;
            for (int64_t j = 0; j < n; j++) {
                DevChunk *c = &s->dev[(s->dh + s->dn) % s->W];
                c->vf = vf;
                c->ri = qa[*h];
                s->dn++;
            }
            r->remaining -= n;
            room -= n;
            if (!r->remaining) (*h)++;
        }
    }
}

/* SharedSSD.commit */
static void sh_commit(SSD *s, int64_t a) {
    while (s->dn) {
        const int64_t span = s->spans[s->dn - 1];
        const int64_t need = s->dev[s->dh].vf - s->V;
        const int64_t dt = need > 0 ? ceil_mul_div(need, span, SHARE_UNITS) : 0;
        const int64_t t = s->t + dt;
        if (t > a) return;
        s->V += floor_mul_div(dt, SHARE_UNITS, span);
        s->t = t;
        s->proj_ok = 0;
        while (s->dn && s->dev[s->dh].vf <= s->V) {
            const int64_t ri = s->dev[s->dh].ri;
            s->dh = (s->dh + 1) % s->W;
            s->dn--;
            s->queued--;
            Rd *r = &s->rd[ri];
            if (--r->left == 0) {
                r->finish = t + s->access;
                if (r->finish > s->last_finish) s->last_finish = r->finish;
                s->done[s->n_done++] = ri;
            }
        }
        sh_fill(s);
    }
}

/* SharedSSD._project: every read not yet landed, if nothing more is issued */
static void sh_project(SSD *s) {
    if (s->proj_ok) return;
    const int64_t W = s->W;
    int64_t V = s->V, t = s->t, last = s->last_finish;
    int64_t ph = 0, pn = s->dn;
    for (int64_t j = 0; j < pn; j++) {
        s->pdev[j] = s->dev[(s->dh + j) % W];
        s->pleft[s->pdev[j].ri] = s->rd[s->pdev[j].ri].left;
    }
    int64_t nq = 0;
    for (int q = 0; q < 2; q++) {
        const int64_t *qa = q == 0 ? s->fgq : s->bgq;
        const int64_t h = q == 0 ? s->fg_h : s->bg_h, tl = q == 0 ? s->fg_t : s->bg_t;
        for (int64_t j = h; j < tl; j++) {
            s->pq_ri[nq] = qa[j];
            s->pq_rem[nq++] = s->rd[qa[j]].remaining;
            s->pleft[qa[j]] = s->rd[qa[j]].left;
        }
    }
    int64_t qi = 0;
    while (pn) {
        const int64_t span = s->spans[pn - 1];
        const int64_t need = s->pdev[ph].vf - V;
        const int64_t dt = need > 0 ? ceil_mul_div(need, span, SHARE_UNITS) : 0;
        t += dt;
        V += floor_mul_div(dt, SHARE_UNITS, span);
        while (pn && s->pdev[ph].vf <= V) {
            const int64_t ri = s->pdev[ph].ri;
            ph = (ph + 1) % W;
            pn--;
            if (--s->pleft[ri] == 0) {
                s->pfin[ri] = t + s->access;
                if (t + s->access > last) last = t + s->access;
            }
        }
        int64_t room = W - pn;
        while (room && qi < nq) {
            int64_t n = s->pq_rem[qi] < room ? s->pq_rem[qi] : room;
            for (int64_t j = 0; j < n; j++) {
                DevChunk *c = &s->pdev[(ph + pn) % W];
                c->vf = V + SHARE_UNITS;
                c->ri = s->pq_ri[qi];
                pn++;
            }
            s->pq_rem[qi] -= n;
            room -= n;
            if (!s->pq_rem[qi]) qi++;
        }
    }
    s->plast = last;
    s->proj_ok = 1;
}

static inline int64_t ssd_start(const SSD *s, int64_t j) {
    return s->free[j % s->C] + s->shift + (j / s->C) * s->d;
}

static int64_t bisect_right64(const int64_t *a, int n, int64_t x) {
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (x < a[mid]) hi = mid;
        else lo = mid + 1;
    }
    return lo;
}
static int64_t bisect_left64(const int64_t *a, int n, int64_t x) {
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (a[mid] < x) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static void ssd_commit(SSD *s, int64_t a) {
    if (s->shared) {
        sh_commit(s, a);
        return;
    }
    int64_t *free_ = s->free;
    const int C = s->C;
    int64_t rel = a - s->shift;
    int64_t relh = rel + s->lag;
    if (relh < free_[0]) return;
    if (s->queued) {
        const int64_t d = s->d;
        int64_t fmax = free_[C - 1];
        int64_t n0 = fmax <= relh ? (relh - fmax) / d + 1 : 0;
        int64_t k = (int64_t)C * n0 + bisect_right64(free_, C, relh - n0 * d);
        if (k > s->queued) k = s->queued;
        if (k) {
            int64_t left = k, pos = 0;
            const int64_t shift = s->shift;
            for (int q = 0; q < 2 && left; q++) {
                int64_t *qa = q == 0 ? s->fgq : s->bgq;
                int64_t *h = q == 0 ? &s->fg_h : &s->bg_h;
                int64_t tl = q == 0 ? s->fg_t : s->bg_t;
                while (*h < tl && left) {
                    Rd *r = &s->rd[qa[*h]];
                    if (r->remaining <= left) {
                        int64_t last = pos + r->remaining - 1;
                        r->finish = free_[last % C] + shift + (last / C + 1) * d + s->access;
                        if (r->finish > s->last_finish) s->last_finish = r->finish;
                        left -= r->remaining;
                        pos += r->remaining;
                        r->remaining = 0;
                        s->done[s->n_done++] = qa[*h];
                        (*h)++;
                    } else {
                        r->remaining -= left;
                        pos += left;
                        left = 0;
                    }
                }
            }
            int64_t rounds = k / C, extra = k % C;
            if (extra) {
                int64_t tmp[C];
                for (int i = 0; i < C; i++)
                    tmp[i] = i + extra < C ? free_[i + extra] : free_[i + extra - C] + d;
                memcpy(free_, tmp, sizeof(int64_t) * C);
            }
            s->shift += rounds * d;
            rel = a - s->shift;
            s->queued -= k;
            s->fg_chunks -= k < s->fg_chunks ? k : s->fg_chunks;
        }
    }
    if (free_[0] < rel) {
        int64_t i = bisect_left64(free_, C, rel);
        for (int64_t j = 0; j < i; j++) free_[j] = rel;
    }
}

static int64_t ssd_issue(SSD *s, int32_t key, int fg, int64_t a, int registered) {
    ssd_commit(s, a);
    int64_t i = s->n_rd++;
    Rd *r = &s->rd[i];
    r->key = key;
    r->fg = (int8_t)fg;
    r->registered = (int8_t)registered;
    r->remaining = s->m;
    r->left = s->m;
    r->finish = -1;
    s->queued += s->m;
    if (s->shared) {
        s->proj_ok = 0;
        if (fg) s->fgq[s->fg_t++] = i;
        else s->bgq[s->bg_t++] = i;
        if (s->dn < s->W) {
            if (s->dn) s->V += floor_mul_div(a - s->t, SHARE_UNITS, s->spans[s->dn - 1]);
            s->t = a;
            sh_fill(s);
        }
        return i;
    }
    if (fg) {
        s->fgq[s->fg_t++] = i;
        s->fg_chunks += s->m;
        s->fg_finish = ssd_start(s, s->fg_chunks - 1) + s->d + s->access;
    } else {
        s->bgq[s->bg_t++] = i;
    }
    return i;
}

static int64_t ssd_busy_until(SSD *s) {
    if (s->shared) {
        if (!s->queued) return s->last_finish;
        sh_project(s);
        return s->plast;
    }
    if (s->queued) return ssd_start(s, s->queued - 1) + s->d + s->access;
    return s->last_finish;
}

static int64_t ssd_finish_of(SSD *s, int64_t ri) {
    const Rd *r = &s->rd[ri];
    if (s->shared) {
        if (r->finish >= 0) return r->finish;
        sh_project(s);
        return s->pfin[ri];
    }
    if (r->remaining == 0) return r->finish;
    int64_t pos = 0;
    for (int64_t j = s->fg_h; j < s->fg_t; j++) {
        const Rd *q = &s->rd[s->fgq[j]];
        if (s->fgq[j] == ri) return ssd_start(s, pos + q->remaining - 1) + s->d + s->access;
        pos += q->remaining;
    }
    for (int64_t j = s->bg_h; j < s->bg_t; j++) {
        const Rd *q = &s->rd[s->bgq[j]];
        if (s->bgq[j] == ri) return ssd_start(s, pos + q->remaining - 1) + s->d + s->access;
        pos += q->remaining;
    }
    return -1; /* not reached */
}

/* -- the cache (ExpertCache with prefetch) ------------------------------------------ */

typedef struct {
    const mer_policy *pol;
    int k, glob;
    int32_t N, E, L, n_parts;
    size_t *soff;
    char *states;
    void **shared;
    int32_t *cap, *resident, *pin_res, *base;
    uint8_t *state, *is_pf, *claimed, *unused, *pinned, *step_read;
    int64_t *spec_target; /* -1: None */
    int32_t pf_slots, reclaim;
    oset spec, useless;
    int32_t *infl, *infl_pos; /* keys in flight, and where each is in infl */
    int32_t n_infl;
    int64_t n_infl_pf;
    uint32_t *mark;
    uint32_t stamp;
    int32_t *loc; /* scratch: local keys of a step */
    int64_t *st;  /* 8 x L */
} Cache;

enum { S_HITS, S_MISSES, S_LATE, S_EVICT, S_BYPASS, S_PF_ISSUED, S_PF_USED, S_PF_WASTED };

static inline int32_t part_of(const Cache *c, int32_t key) { return c->glob ? 0 : key / c->E; }
static inline void *pstate(const Cache *c, int p) { return c->states + c->soff[p]; }
static inline void cnt(Cache *c, int what, int32_t key) { c->st[what * c->L + key / c->E]++; }

static void infl_add(Cache *c, int32_t x) {
    c->infl_pos[x] = c->n_infl;
    c->infl[c->n_infl++] = x;
}
static void infl_del(Cache *c, int32_t x) {
    int32_t i = c->infl_pos[x];
    int32_t y = c->infl[--c->n_infl];
    c->infl[i] = y;
    c->infl_pos[y] = i;
}

static uint32_t new_stamp(Cache *c) {
    if (++c->stamp == 0) {
        memset(c->mark, 0, sizeof(uint32_t) * c->N);
        c->stamp = 1;
    }
    return c->stamp;
}

/* `_evict` after the policy has forgotten `v` */
static void evicted(Cache *c, int p, int32_t v) {
    c->resident[p]--;
    if (c->pinned && c->pinned[v]) c->pin_res[p]--;
    if (c->state[v] == IN_FLIGHT) {
        infl_del(c, v);
        c->step_read[v] = 0;
    }
    c->state[v] = ABSENT;
    cnt(c, S_EVICT, v);
    if (c->unused[v]) {
        c->unused[v] = 0;
        cnt(c, S_PF_WASTED, v);
    }
    if (oset_has(&c->spec, v)) oset_del(&c->spec, v);
    oset_del(&c->useless, v);
}

/* `_admit`: 1 with a slot, 0 without (bypass for a demand read) */
static int admit(Cache *c, int32_t key, const int32_t *prot_keys, int n_prot, int rank,
                 int prefetch) {
    const int p = part_of(c, key);
    const int32_t base = c->base[p];
    const mer_policy *pol = c->pol;
    void *s = pstate(c, p);
    if (pol->prepare) pol->prepare(s, key - base);
    if (c->resident[p] >= c->cap[p]) {
        /* protected: prot_keys, pins and every key in flight */
        uint32_t stamp = new_stamp(c);
        int32_t held = 0;
        for (int i = 0; i < n_prot + c->n_infl; i++) {
            int32_t y = i < n_prot ? prot_keys[i] : c->infl[i - n_prot];
            if (c->mark[y] == stamp) continue;
            c->mark[y] = stamp;
            if (c->state[y] != ABSENT && part_of(c, y) == p && !(c->pinned && c->pinned[y]))
                held++;
        }
        int32_t v = -1;
        if (c->useless.n_in) { /* _reclaim_victim */
            for (int32_t y = c->useless.nxt[c->useless.S]; y != c->useless.S;
                 y = c->useless.nxt[y]) {
                if (c->state[y] == READY && c->mark[y] != stamp && !(c->pinned && c->pinned[y]) &&
                    part_of(c, y) == p) {
                    v = y;
                    pol->remove(s, y - base);
                    break;
                }
            }
        }
        if (v < 0 && c->resident[p] - c->pin_res[p] - held > 0) {
            mer_prot pr = {c->mark + base, stamp, 1, c->pinned ? c->pinned + base : NULL};
            int32_t lv = pol->evict(s, &pr);
            if (lv >= 0) v = lv + base;
        }
        if (v < 0 && !prefetch) { /* _step_victim */
            for (int r = n_prot - 1; r > rank; r--) {
                int32_t y = prot_keys[r];
                if (c->state[y] == READY && !(c->pinned && c->pinned[y]) && part_of(c, y) == p) {
                    v = y;
                    pol->remove(s, y - base);
                    break;
                }
            }
        }
        if (v < 0) {
            if (!prefetch) cnt(c, S_BYPASS, key);
            return 0;
        }
        evicted(c, p, v);
    }
    c->resident[p]++;
    if (c->pinned && c->pinned[key]) c->pin_res[p]++;
    c->state[key] = IN_FLIGHT;
    infl_add(c, key);
    if (!prefetch) c->step_read[key] = 1;
    pol->insert(s, key - base);
    if (prefetch) {
        c->is_pf[key] = 1;
        c->n_infl_pf++;
        oset_add(&c->spec, key);
        c->spec_target[key] = -1;
        cnt(c, S_PF_ISSUED, key);
    }
    return 1;
}

static void complete_key(Cache *c, int32_t key) {
    if (c->state[key] != IN_FLIGHT) return;
    c->state[key] = READY;
    infl_del(c, key);
    if (c->is_pf[key]) {
        c->is_pf[key] = 0;
        c->n_infl_pf--;
        if (c->claimed[key]) c->claimed[key] = 0;
        else c->unused[key] = 1;
    }
}

static int in_list(const int32_t *a, int n, int32_t x) {
    for (int i = 0; i < n; i++)
        if (a[i] == x) return 1;
    return 0;
}

/* `ExpertCache.prefetch`: 1 if admitted as a background read */
static int prefetch_key(Cache *c, int32_t key, const int32_t *protect, int n_prot,
                        int64_t target) {
    if (c->state[key] != ABSENT) {
        if (oset_has(&c->spec, key)) {
            int64_t old = c->spec_target[key];
            c->spec_target[key] = old < 0 || target > old ? target : old;
            oset_del(&c->useless, key);
        }
        return 0;
    }
    if (c->pf_slots) {
        const int p = part_of(c, key);
        int64_t mine = 0;
        int32_t landed = -1, wrong = -1;
        for (int32_t y = c->spec.nxt[c->spec.S]; y != c->spec.S; y = c->spec.nxt[y]) {
            if (part_of(c, y) != p) continue;
            mine++;
            if (c->state[y] == READY && !in_list(protect, n_prot, y) &&
                !(c->pinned && c->pinned[y])) {
                if (landed < 0) landed = y;
                if (wrong < 0 && oset_has(&c->useless, y)) wrong = y;
            }
        }
        if (mine >= c->pf_slots) {
            int32_t v = wrong >= 0 ? wrong : landed;
            if (v < 0) return 0;
            c->pol->remove(pstate(c, p), v - c->base[p]);
            evicted(c, p, v);
        }
    }
    if (!admit(c, key, protect, n_prot, n_prot, 1)) return 0;
    c->spec_target[key] = target;
    return 1;
}

/* `_mark_missed`: guesses aimed at step t or earlier that step t did not look up */
static void mark_missed(Cache *c, int64_t t) {
    for (int32_t y = c->spec.nxt[c->spec.S]; y != c->spec.S; y = c->spec.nxt[y]) {
        int64_t tg = c->spec_target[y];
        if (tg >= 0 && tg <= t) oset_add(&c->useless, y);
    }
}

/* -- the run ------------------------------------------------------------------------ */

typedef struct {
    mer_sim_out *o;
    int observe;
} Rec;

static inline int rec_look(Rec *r, int64_t a, int64_t b, int64_t p) {
    if (!r->observe) return 0;
    mer_sim_out *o = r->o;
    if (o->n_obs >= o->max_obs) return -2;
    o->obs_a[o->n_obs] = a;
    o->obs_b[o->n_obs] = b;
    o->obs_p[o->n_obs] = p;
    o->n_obs++;
    return 0;
}

static int ffn_look(Rec *r, int64_t s, int64_t e, int busy, int64_t poll) {
    if (!r->observe || !busy) return 0;
    if (poll) return rec_look(r, s, e, poll);
    int rc = rec_look(r, s, s, 0);
    return rc ? rc : rec_look(r, e, e, 0);
}

static void cache_free(Cache *c) {
    free(c->soff);
    free(c->states);
    if (c->shared)
        for (int p = 0; p < c->n_parts; p++) {
            if (c->shared[p] && c->pol && c->pol->free_shared) c->pol->free_shared(c->shared[p]);
            free(c->shared[p]);
        }
    free(c->shared);
    free(c->cap);
    free(c->resident);
    free(c->pin_res);
    free(c->base);
    free(c->state);
    free(c->is_pf);
    free(c->claimed);
    free(c->unused);
    free(c->step_read);
    free(c->spec_target);
    oset_free(&c->spec);
    oset_free(&c->useless);
    free(c->infl);
    free(c->infl_pos);
    free(c->mark);
    free(c->loc);
}

static int cache_init(Cache *c, const mer_sim_cfg *g, const uint8_t *pinned, const double *params,
                      const int32_t *caps, int64_t *stats) {
    memset(c, 0, sizeof(*c));
    if (g->policy < 0 || g->policy >= N_POLICIES) return -3;
    c->pol = REGISTRY[g->policy];
    c->k = g->k;
    c->glob = g->global_scope;
    c->E = g->n_experts;
    c->L = g->n_layers;
    c->N = c->E * c->L;
    c->n_parts = c->glob ? 1 : c->L;
    c->pf_slots = g->prefetch_slots;
    c->reclaim = g->prefetch_reclaim;
    c->st = stats;
    const int32_t N = c->N, np_ = c->n_parts;
    c->soff = calloc(np_ + 1, sizeof(size_t));
    c->shared = calloc(np_, sizeof(void *));
    c->cap = calloc(np_, sizeof(int32_t));
    c->resident = calloc(np_, sizeof(int32_t));
    c->pin_res = calloc(np_, sizeof(int32_t));
    c->base = calloc(np_, sizeof(int32_t));
    c->state = calloc(N, 1);
    c->is_pf = calloc(N, 1);
    c->claimed = calloc(N, 1);
    c->unused = calloc(N, 1);
    c->step_read = calloc(N, 1);
    c->spec_target = calloc(N, sizeof(int64_t));
    c->infl = calloc(N, sizeof(int32_t));
    c->infl_pos = calloc(N, sizeof(int32_t));
    c->mark = calloc(N, sizeof(uint32_t));
    c->loc = calloc(c->k, sizeof(int32_t));
    c->pinned = (uint8_t *)pinned;
    if (!c->soff || !c->shared || !c->cap || !c->resident || !c->pin_res || !c->base ||
        !c->state || !c->is_pf || !c->claimed || !c->unused || !c->step_read ||
        !c->spec_target || !c->infl || !c->infl_pos || !c->mark || !c->loc ||
        oset_init(&c->spec, N) || oset_init(&c->useless, N))
        return -1;
    const int32_t nk = c->glob ? N : c->E;
    size_t total = 0;
    for (int p = 0; p < np_; p++) {
        c->cap[p] = caps[p];
        c->base[p] = c->glob ? 0 : p * c->E;
        mer_ctx ctx = {caps[p], nk, c->base[p], c->k, params + (size_t)p * g->n_params,
                       pinned ? pinned + c->base[p] : NULL, NULL, 1};
        c->soff[p] = total;
        total += (c->pol->size(&ctx) + 63) & ~(size_t)63;
    }
    c->states = aligned_alloc(64, total ? total : 64);
    if (!c->states) return -1;
    for (int p = 0; p < np_; p++) {
        mer_ctx ctx = {caps[p], nk, c->base[p], c->k, params + (size_t)p * g->n_params,
                       pinned ? pinned + c->base[p] : NULL, NULL, 1};
        if (c->pol->shared_size) {
            c->shared[p] = calloc(1, c->pol->shared_size(&ctx));
            if (!c->shared[p]) return -1;
            ctx.shared = c->shared[p];
        }
        c->pol->init(pstate(c, p), &ctx);
    }
    return 0;
}

/* `_ffn_schedule`: the step's end; durations into durs, FFNs started with reads outstanding
   into n_busy, whether a worker waited for weights (an FFN woke) into blocked */
static int ffn_schedule(const mer_sim_cfg *g, Rec *rec, const int64_t *ready, int64_t tc,
                        int64_t bu, int64_t *durs, int64_t *end, int64_t *n_busy,
                        int *blocked) {
    const int k = g->k, W = g->workers;
    const int64_t ffn = g->ffn, fb = g->ffn_busy, wake = g->ffn_wake;
    int64_t rmax = ready[0];
    for (int i = 1; i < k; i++)
        if (ready[i] > rmax) rmax = ready[i];
    *n_busy = 0;
    *blocked = 0;
    if (rmax == tc && bu <= tc) {
        for (int i = 0; i < k; i++) durs[i] = ffn;
        *end = tc + (int64_t)((k + W - 1) / W) * ffn;
        return 0;
    }
    int order[k];
    int n = 0;
    for (int i = 0; i < k; i++)
        if (ready[i] <= tc) order[n++] = i;
    for (int i = 0; i < k; i++)
        if (ready[i] > tc) order[n++] = i;
    int rc;
    if (W == 1) {
        int64_t w = tc;
        int woke = 0;
        if (g->seed && rmax > w) {
            if ((rc = rec_look(rec, w, rmax, 0))) return rc;
            w = rmax;
            woke = 1;
        }
        for (int j = 0; j < k; j++) {
            int64_t rt = ready[order[j]];
            if (rt > w) {
                if ((rc = rec_look(rec, w, rt, 0))) return rc;
                w = rt;
                woke = 1;
            }
            int busy = bu > w;
            int64_t dur = busy ? ffn + fb : ffn;
            if (woke) {
                dur += wake;
                *blocked = 1;
                woke = 0;
            }
            *n_busy += busy;
            if ((rc = ffn_look(rec, w, w + dur, busy, g->poll))) return rc;
            durs[j] = dur;
            w += dur;
        }
        *end = w;
        return 0;
    }
    int64_t r_all = g->seed ? rmax : tc;
    int64_t wfree[W];
    for (int i = 0; i < W; i++) wfree[i] = tc;
    int64_t e = tc;
    for (int j = 0; j < k; j++) {
        int mi = 0;
        for (int i = 1; i < W; i++)
            if (wfree[i] < wfree[mi]) mi = i;
        int64_t st = wfree[mi];
        if (ready[order[j]] > st) st = ready[order[j]];
        if (r_all > st) st = r_all;
        int busy = bu > st;
        int64_t dur = busy ? ffn + fb : ffn;
        if (st > wfree[mi]) {
            dur += wake;
            *blocked = 1;
        }
        *n_busy += busy;
        durs[j] = dur;
        wfree[mi] = st + dur;
        if (st + dur > e) e = st + dur;
    }
    *end = e;
    return 0;
}

static int64_t makespan(const int64_t *durs, int k, int W) {
    int64_t s = 0;
    if (W == 1) {
        for (int i = 0; i < k; i++) s += durs[i];
        return s;
    }
    int64_t f[W];
    for (int i = 0; i < W; i++) f[i] = 0;
    for (int j = 0; j < k; j++) {
        int mi = 0;
        for (int i = 1; i < W; i++)
            if (f[i] < f[mi]) mi = i;
        f[mi] += durs[j];
    }
    for (int i = 0; i < W; i++)
        if (f[i] > s) s = f[i];
    return s;
}

static void ssd_free(SSD *s) {
    free(s->dev);
    free(s->pdev);
    free(s->pfin);
    free(s->pleft);
    free(s->pq_ri);
    free(s->pq_rem);
    free(s->free);
    free(s->fgq);
    free(s->bgq);
    free(s->done);
    free(s->rd);
}

/* finish_reads: commit to t, then forget every registered read landed by t */
static void finish_reads(SSD *s, int64_t *inflight_read, int64_t t) {
    if (s->queued) ssd_commit(s, t);
    int64_t j = 0;
    for (int64_t i = 0; i < s->n_done; i++) {
        int64_t ri = s->done[i];
        Rd *r = &s->rd[ri];
        if (r->finish <= t) {
            /* the decisions had it landed already (Replay._landed); a key evicted and
               read again keeps its newer read */
            if (r->registered && inflight_read[r->key] == ri) inflight_read[r->key] = -1;
        } else {
            s->done[j++] = ri;
        }
    }
    s->n_done = j;
}

int mer_sim_run(const mer_sim_cfg *g, const int32_t *steps, int64_t n_steps,
                const int64_t *w_off, const int32_t *w_key, const int64_t *w_target,
                const uint8_t *pinned, const double *params, const int32_t *caps,
                mer_sim_out *o) {
    const int k = g->k;
    const int32_t N = g->n_layers * g->n_experts;
    if (k < 1 || g->channels < 1 || g->workers < 1 || g->chunk < 1) return -3;
    for (int64_t i = 0; i < n_steps * k; i++)
        if (steps[i] < 0 || steps[i] >= N) return -3;
    for (int64_t i = 0; i < w_off[n_steps]; i++)
        if (w_key[i] < 0 || w_key[i] >= N) return -3;
    if (mer_first_repeat(steps, n_steps, k) >= 0) return -5; /* a key twice in a step */
    memset(o->stats, 0, sizeof(int64_t) * 8 * g->n_layers);
    o->n_reads = o->n_obs = 0;
    Cache c;
    SSD s;
    memset(&s, 0, sizeof(s));
    int64_t *inflight_read = malloc(sizeof(int64_t) * N);
    int64_t max_w = 0;
    for (int64_t t = 0; t < n_steps; t++)
        if (w_off[t + 1] - w_off[t] > max_w) max_w = w_off[t + 1] - w_off[t];
    int32_t *protect = malloc(sizeof(int32_t) * (k + max_w));
    int32_t *pfs = malloc(sizeof(int32_t) * (max_w + 1));
    int32_t *ahead = malloc(sizeof(int32_t) * (N + max_w + 1)); /* Replay._ahead */
    int64_t *ahead_at = malloc(sizeof(int64_t) * (N + max_w + 1)); /* ... issued at */
    int64_t n_ahead = 0;
    int64_t *ready = malloc(sizeof(int64_t) * k), *durs = malloc(sizeof(int64_t) * k);
    int32_t *rk_read = malloc(sizeof(int32_t) * k);
    uint8_t *hit = malloc(k), *late = malloc(k), *phys = malloc(k);
    int rc = cache_init(&c, g, pinned, params, caps, o->stats);
    s.C = g->channels;
    s.m = g->chunks;
    s.d = g->chunk;
    s.access = g->access;
    s.lag = g->lag;
    s.free = calloc(s.C, sizeof(int64_t));
    s.fgq = malloc(sizeof(int64_t) * (o->max_reads + 1));
    s.bgq = malloc(sizeof(int64_t) * (o->max_reads + 1));
    s.done = malloc(sizeof(int64_t) * (o->max_reads + 1));
    s.rd = malloc(sizeof(Rd) * (o->max_reads + 1));
    int own_bad = 0;
    if (g->n_share > 0) {
        s.shared = 1;
        s.W = g->n_share;
        s.spans = g->share;
        for (int64_t j = 0; j < s.W; j++)
            if (s.spans[j] < 1) own_bad = 1;
        s.dev = malloc(sizeof(DevChunk) * s.W);
        s.pdev = malloc(sizeof(DevChunk) * s.W);
        s.pfin = malloc(sizeof(int64_t) * (o->max_reads + 1));
        s.pleft = malloc(sizeof(int64_t) * (o->max_reads + 1));
        s.pq_ri = malloc(sizeof(int64_t) * (o->max_reads + 1));
        s.pq_rem = malloc(sizeof(int64_t) * (o->max_reads + 1));
        if (!rc && (!s.dev || !s.pdev || !s.pfin || !s.pleft || !s.pq_ri || !s.pq_rem)) rc = -1;
        if (!rc && own_bad) rc = -3;
    }
    int64_t *own_ri = malloc(sizeof(int64_t) * k);
    int *own_rank = malloc(sizeof(int) * k);
    if (!rc && (!own_ri || !own_rank)) rc = -1;
    if (!rc && (!inflight_read || !protect || !pfs || !ready || !durs || !rk_read || !hit ||
                !late || !phys || !ahead || !ahead_at || !s.free || !s.fgq || !s.bgq || !s.done ||
                !s.rd))
        rc = -1;
    if (rc) goto out;
    for (int32_t i = 0; i < N; i++) inflight_read[i] = -1;
    Rec rec = {o, g->workers == 1};
    int64_t now = 0;
    const mer_policy *pol = c.pol;
    const int64_t reap = g->complete;
    int blocked = 0; /* the previous step's driver waited for weights */
    for (int64_t t = 0; t < n_steps; t++) {
        const int32_t *keys = steps + t * k;
        const int64_t d_t = blocked ? g->dense + g->dense_wake : g->dense;
        const int64_t t0 = now, t1 = t0 + d_t;
        finish_reads(&s, inflight_read, t1);
        if ((rc = rec_look(&rec, t1, t1, 0))) goto out;
        /* -- access_step -- */
        const int p = part_of(&c, keys[0]);
        void *ps = pstate(&c, p);
        const int32_t base = c.base[p];
        for (int r = 0; r < k; r++) c.loc[r] = keys[r] - base;
        if (pol->begin) pol->begin(ps, t, c.loc, NULL, k);
        int nh = 0;
        for (int r = 0; r < k; r++) {
            int32_t x = keys[r];
            if (c.spec.n_in && oset_has(&c.spec, x)) {
                oset_del(&c.spec, x);
                oset_del(&c.useless, x);
            }
            if (c.state[x] == READY) {
                hit[r] = 1;
                late[r] = 0;
                nh++;
                if (pol->hit) pol->hit(ps, x - base);
                if (c.unused[x]) {
                    c.unused[x] = 0;
                    cnt(&c, S_PF_USED, keys[0]);
                }
            } else {
                hit[r] = 0;
                late[r] = c.state[x] == IN_FLIGHT;
                if (late[r] && c.is_pf[x] && !c.claimed[x]) {
                    cnt(&c, S_LATE, keys[0]);
                    c.claimed[x] = 1;
                }
            }
        }
        /* Replay.mark_late: a hit still being read (a prefetch not landed by t1) */
        int n_late = 0;
        for (int r = 0; r < k; r++) {
            phys[r] = 0;
            if (hit[r] && inflight_read[keys[r]] >= 0) {
                phys[r] = 1;
                n_late++;
            }
        }
        nh -= n_late;
        c.st[S_HITS * c.L + keys[0] / c.E] += nh;
        c.st[S_MISSES * c.L + keys[0] / c.E] += k - nh;
        c.st[S_PF_USED * c.L + keys[0] / c.E] -= n_late;
        c.st[S_LATE * c.L + keys[0] / c.E] += n_late;
        int nr = 0;
        for (int r = 0; r < k; r++) c.step_read[keys[r]] = 0;
        for (int r = 0; r < k; r++) {
            if (hit[r] || late[r]) continue;
            rk_read[nr++] = admit(&c, keys[r], keys, k, r, 0) ? r : -1 - r;
        }
        if (pol->end) pol->end(ps, t, c.loc, k);
        if (c.reclaim && c.spec.n_in) mark_missed(&c, t);
        /* -- the demand reads -- */
        for (int r = 0; r < k; r++) ready[r] = t1;
        int64_t at = t1 + g->step;
        for (int j = 0; j < nr; j++) {
            int r = rk_read[j] >= 0 ? rk_read[j] : -1 - rk_read[j];
            int32_t x = keys[r];
            int registered = rk_read[j] >= 0 && c.state[x] != ABSENT;
            at += g->submit;
            if (o->n_reads >= o->max_reads) {
                rc = -2;
                goto out;
            }
            int64_t ri = ssd_issue(&s, x, 1, at, registered);
            o->read_issued[o->n_reads] = at;
            o->read_key[o->n_reads] = x;
            o->read_step[o->n_reads] = t;
            o->n_reads++;
            if (registered) inflight_read[x] = ri;
            own_ri[j] = ri;
            own_rank[j] = r;
        }
        /* Replay._landed: the step's reads land for every later decision */
        for (int j = 0; j < nr; j++)
            if (rk_read[j] >= 0) complete_key(&c, keys[rk_read[j]]);
        /* -- Replay.prefetch -- */
        int npf = 0;
        const int64_t w0 = w_off[t], nw = w_off[t + 1] - w0;
        if (nw) {
            for (int r = 0; r < k; r++) protect[r] = keys[r];
            for (int64_t j = 0; j < nw; j++) protect[k + j] = w_key[w0 + j];
            /* outstanding guesses: aimed at a step still ahead, not yet looked up, and
               (hold > 0) issued fewer than hold steps ago */
            const int64_t since = g->hold > 0 ? t - g->hold : -1;
            int64_t na = 0;
            for (int64_t j = 0; j < n_ahead; j++) {
                int32_t y = ahead[j];
                if (ahead_at[j] > since && oset_has(&c.spec, y) && c.spec_target[y] > t) {
                    ahead_at[na] = ahead_at[j];
                    ahead[na++] = y;
                }
            }
            n_ahead = na;
            for (int64_t j = 0; j < nw; j++) {
                if (n_ahead >= g->max_inflight) break;
                int32_t x = w_key[w0 + j];
                if (prefetch_key(&c, x, protect, (int)(k + nw), w_target[w0 + j])) {
                    pfs[npf++] = x;
                    ahead_at[n_ahead] = t;
                    ahead[n_ahead++] = x;
                }
            }
        }
        for (int j = 0; j < npf; j++) complete_key(&c, pfs[j]); /* Replay._landed */
        for (int j = 0; j < npf; j++) {
            at += g->submit;
            if (o->n_reads >= o->max_reads) {
                rc = -2;
                goto out;
            }
            int64_t ri = ssd_issue(&s, pfs[j], 0, at, 1);
            o->read_issued[o->n_reads] = at;
            o->read_key[o->n_reads] = pfs[j];
            o->read_step[o->n_reads] = t;
            o->n_reads++;
            inflight_read[pfs[j]] = ri;
        }
        const int64_t tc = at + (int64_t)(nr + npf) * reap;
        if ((rc = rec_look(&rec, tc, tc, 0))) goto out;
        /* when they land once the step's reads are all issued (a shared device serves
           the prefetches with them; on the channel model a demand read's is final) */
        for (int j = 0; j < nr; j++) ready[own_rank[j]] = ssd_finish_of(&s, own_ri[j]);
        for (int r = 0; r < k; r++) {
            if (late[r] || phys[r]) ready[r] = ssd_finish_of(&s, inflight_read[keys[r]]);
            if (ready[r] < tc) ready[r] = tc;
        }
        int64_t t2, n_busy;
        if ((rc = ffn_schedule(g, &rec, ready, tc, ssd_busy_until(&s), durs, &t2, &n_busy,
                               &blocked)))
            goto out;
        int64_t io = t2 - tc - makespan(durs, k, g->workers);
        int64_t comp = 0;
        for (int j = 0; j < k; j++) comp += durs[j];
        int64_t *row = o->per_step + t * 10;
        row[0] = t2 - t0;
        row[1] = io > 0 ? io : 0;
        row[2] = comp;
        row[3] = g->ffn_busy ? n_busy : 0;
        row[4] = tc - t1;
        row[5] = nh;
        row[6] = n_late;
        row[7] = npf;
        row[8] = nr + npf;
        row[9] = d_t;
        now = t2;
    }
    o->end = now;
    finish_reads(&s, inflight_read, now);
    if (s.queued) ssd_commit(&s, s.shared ? INT64_MAX : ssd_start(&s, s.queued - 1) + s.d);
    for (int64_t i = 0; i < o->n_reads; i++) o->read_finish[i] = s.rd[i].finish;
out:
    cache_free(&c);
    ssd_free(&s);
    free(inflight_read);
    free(protect);
    free(pfs);
    free(ahead);
    free(ahead_at);
    free(ready);
    free(durs);
    free(rk_read);
    free(own_ri);
    free(own_rank);
    free(hit);
    free(late);
    free(phys);
    return rc;
}
