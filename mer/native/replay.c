/* Compiled hit-only replays of the core's eviction policies, under the step semantics.

   The Python classes in mer/core/policies.py define every policy; this file
   restates them for speed and is tested against them (tests/test_replay_native.py)
   on random traces at every size, both scopes, k = 1, 2 and 8, with static pins
   and with caches smaller than a step. The driver below is `_counts_no_prefetch`
   of mer/core/replay.py (the clockless replay with prefetch off) in C:

     begin_step; look all k keys up (hit hooks in rank order); then each miss in
     rank order: prepare_admit; if the partition is full: evict an unprotected
     key (protected = static pins and, for step-protecting policies, the step's
     keys), else the worst-ranked resident step key ranked below the miss
     (caches smaller than the step), else bypass; insert; end_step.

   Many caches of one policy (one per cache size) run side by side over one read
   of the trace: that is how `mer mrc` gets a curve for every size of a policy
   without the stack property.

   HOW TO ADD A POLICY (say the Python class `Foo` registered as "foo"):
   1. Write its state struct and its hooks below, mirroring the Python hooks:
      `arrays` (lay out the state's arrays; it serves both `size` and `init`),
      `init`, and whichever of begin/hit/prepare/end it overrides, plus
      `evict` (choose the victim among resident keys with `!is_prot(p, key)`,
      commit whatever the Python victim()'s plan would commit, remove it from
      the policy's structures and return it; -1 if none), `remove` (forget a
      named key: the Python on_remove without a plan) and `insert`.
      The driver guarantees that for step-protecting policies `evict` is only
      called when some resident key is unprotected.
   2. Collect them in one `static const mer_policy FOO = {...}` and add `&FOO`
      to REGISTRY at the bottom: the Python side finds it by name. Parameters
      are read from the Python policy object's attributes named in `params`
      (so the Python class stays the one place that sets and checks them).
   3. Add "foo" to the policies the property tests run (they compare hits,
      misses, evictions and bypasses with the Python class).
   Keys are a partition's keys 0..n_keys-1; the global key is key + key_base
   (per-layer scope: key_base = layer * n_experts), for layer-aware policies. */

#include <math.h>
#include <stdint.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

#include "replay.h"

#define INF_POS ((int64_t)1 << 62) /* "never used again", as mer.core.policies.INF */

/* Hooks marked MER_INLINE are inlined into their policy's driver instances (the hot ones). */
#if defined(__GNUC__) || defined(__clang__)
#define MER_INLINE static inline __attribute__((always_inline))
#else
#define MER_INLINE static inline
#endif

/* -- what a policy sees ----------------------------------------------------------- */

typedef struct {
    int32_t cap;          /* this cache's slots */
    int32_t n_keys;       /* keys are 0..n_keys-1 */
    int32_t key_base;     /* global key = key + key_base */
    int k;                /* keys per step */
    const double *p;      /* this cache's parameter row (see `params`) */
    const uint8_t *pinned; /* static pins (n_keys bytes) or NULL */
    void *shared;         /* one block per pass, for state every cache shares */
    int n_caches;         /* caches side by side in this pass */
} mer_ctx;

typedef struct {
    const uint32_t *mark; /* mark[key] == stamp: one of the current step's keys */
    uint32_t stamp;
    int step;             /* the step's keys are protected */
    const uint8_t *pinned;
} mer_prot;

static inline int is_prot(const mer_prot *p, int32_t key) {
    return (p->step && p->mark[key] == p->stamp) || (p->pinned && p->pinned[key]);
}

typedef struct {
    const char *name;
    const char *params;
    int protects_step;
    int needs_future;
    size_t (*size)(const mer_ctx *c);
    size_t (*shared_size)(const mer_ctx *c); /* NULL: no shared block */
    void (*init)(void *s, const mer_ctx *c);
    void (*begin)(void *s, int64_t t, const int32_t *keys, const int64_t *next_use, int k);
    void (*hit)(void *s, int32_t key);
    void (*prepare)(void *s, int32_t key);
    int32_t (*evict)(void *s, const mer_prot *p);
    void (*remove)(void *s, int32_t key);
    void (*insert)(void *s, int32_t key);
    void (*end)(void *s, int64_t t, const int32_t *keys, int k);
    /* optional: release what the shared block allocated on its own (NULL: nothing),
       and whether a hook ran out of memory (NULL: none can) */
    void (*free_shared)(void *shared);
    int (*failed)(const void *shared);
} mer_policy;

/* -- layout helper: one function lays out a state's arrays for size() and init() -- */

typedef struct {
    char *base; /* NULL: only measure */
    size_t n;
} arena;

static void *take(arena *a, size_t bytes) {
    size_t off = (a->n + 15) & ~(size_t)15;
    a->n = off + bytes;
    return a->base ? (void *)(a->base + off) : NULL;
}

#define DEFINE_SIZE_INIT(T, ARRAYS)                                   \
    static size_t T##_size(const mer_ctx *c) {                        \
        T tmp;                                                        \
        arena a = {NULL, sizeof(T)};                                  \
        ARRAYS(&tmp, &a, c);                                          \
        return a.n;                                                   \
    }                                                                 \
    static void T##_lay(T *s, const mer_ctx *c) {                     \
        arena a = {(char *)s, sizeof(T)};                             \
        ARRAYS(s, &a, c);                                             \
    }

/* -- doubly linked lists over keys; sentinels are nodes n_keys + i --------------- */

static inline void l_init(int32_t *prv, int32_t *nxt, int32_t s) { prv[s] = nxt[s] = s; }
static inline void l_push(int32_t *prv, int32_t *nxt, int32_t s, int32_t x) {
    int32_t b = prv[s];
    nxt[b] = x;
    prv[x] = b;
    nxt[x] = s;
    prv[s] = x;
}
static inline void l_unlink(int32_t *prv, int32_t *nxt, int32_t x) {
    int32_t a = prv[x], b = nxt[x];
    nxt[a] = b;
    prv[b] = a;
    prv[x] = nxt[x] = -1;
}

/* -- binary heaps of keys with a position index (LFU, OPT) ----------------------- */

typedef struct {
    int32_t *heap, *pos;
    int32_t n;
} kheap;

typedef int (*before_fn)(const void *s, int32_t a, int32_t b);

static void h_up(kheap *h, const void *s, before_fn before, int32_t i) {
    int32_t x = h->heap[i];
    while (i > 0) {
        int32_t par = (i - 1) >> 1;
        int32_t y = h->heap[par];
        if (!before(s, x, y)) break;
        h->heap[i] = y;
        h->pos[y] = i;
        i = par;
    }
    h->heap[i] = x;
    h->pos[x] = i;
}
static void h_down(kheap *h, const void *s, before_fn before, int32_t i) {
    int32_t x = h->heap[i];
    for (;;) {
        int32_t l = 2 * i + 1;
        if (l >= h->n) break;
        int32_t r = l + 1;
        int32_t m = (r < h->n && before(s, h->heap[r], h->heap[l])) ? r : l;
        if (!before(s, h->heap[m], x)) break;
        h->heap[i] = h->heap[m];
        h->pos[h->heap[i]] = i;
        i = m;
    }
    h->heap[i] = x;
    h->pos[x] = i;
}
static void h_push(kheap *h, const void *s, before_fn before, int32_t x) {
    h->heap[h->n] = x;
    h->pos[x] = h->n;
    h->n++;
    h_up(h, s, before, h->n - 1);
}
static void h_del(kheap *h, const void *s, before_fn before, int32_t x) {
    int32_t i = h->pos[x];
    h->pos[x] = -1;
    h->n--;
    if (i == h->n) return;
    int32_t y = h->heap[h->n];
    h->heap[i] = y;
    h->pos[y] = i;
    h_up(h, s, before, i);
    h_down(h, s, before, h->pos[y]);
}
static void h_fix(kheap *h, const void *s, before_fn before, int32_t x) {
    h_up(h, s, before, h->pos[x]);
    h_down(h, s, before, h->pos[x]);
}
/* The first key in heap order that is not protected, removed from the heap; -1 if none.
   Protected keys met on the way are popped and pushed back (they are at most k). */
static int32_t h_take_first(kheap *h, const void *s, before_fn before, const mer_prot *p,
                            int32_t *tmp) {
    int n = 0;
    int32_t found = -1;
    while (h->n > 0) {
        int32_t x = h->heap[0];
        h_del(h, s, before, x);
        if (is_prot(p, x)) {
            tmp[n++] = x;
            continue;
        }
        found = x;
        break;
    }
    for (int i = 0; i < n; i++) h_push(h, s, before, tmp[i]);
    return found;
}

/* == FIFO and LRU ================================================================== */
/* FIFO: evict the oldest admission. LRU (step granularity): FIFO's queue, and at
   the end of a step its resident keys move to the newest end in reverse rank
   order (rank 0 newest). Hits need no work: the step's keys are protected until
   the end of the step, so where they sit meanwhile changes no victim. */

typedef struct {
    int32_t *prv, *nxt;
    int32_t S;
    const uint8_t *pinned; /* pins never enter the queue: they are never victims, and
                              leaving them out changes no other key's order */
} Queue;

#define QUEUE_ARRAYS(s, a, c)                                               \
    do {                                                                    \
        (s)->prv = take((a), sizeof(int32_t) * ((c)->n_keys + 1));          \
        (s)->nxt = take((a), sizeof(int32_t) * ((c)->n_keys + 1));          \
    } while (0)
DEFINE_SIZE_INIT(Queue, QUEUE_ARRAYS)

static void queue_init(void *sv, const mer_ctx *c) {
    Queue *s = sv;
    Queue_lay(s, c);
    for (int32_t i = 0; i < c->n_keys; i++) s->prv[i] = s->nxt[i] = -1;
    s->S = c->n_keys;
    l_init(s->prv, s->nxt, s->S);
    s->pinned = c->pinned;
}
static void queue_insert(void *sv, int32_t x) {
    Queue *s = sv;
    if (!(s->pinned && s->pinned[x])) l_push(s->prv, s->nxt, s->S, x);
}
static void queue_remove(void *sv, int32_t x) {
    Queue *s = sv;
    if (s->prv[x] >= 0) l_unlink(s->prv, s->nxt, x);
}
static int32_t queue_evict(void *sv, const mer_prot *p) {
    Queue *s = sv;
    for (int32_t x = s->nxt[s->S]; x != s->S; x = s->nxt[x]) {
        if (!is_prot(p, x)) {
            l_unlink(s->prv, s->nxt, x);
            return x;
        }
    }
    return -1;
}
static void lru_end(void *sv, int64_t t, const int32_t *keys, int k) {
    Queue *s = sv;
    (void)t;
    for (int r = k - 1; r >= 0; r--) {
        int32_t x = keys[r];
        if (s->prv[x] >= 0) {
            l_unlink(s->prv, s->nxt, x);
            l_push(s->prv, s->nxt, s->S, x);
        }
    }
}

static const mer_policy FIFO_POLICY = {
    "fifo", "", 1, 0, Queue_size, NULL, queue_init, NULL, NULL, NULL,
    queue_evict, queue_remove, queue_insert, NULL,
};
static const mer_policy LRU_POLICY = {
    "lru", "", 1, 0, Queue_size, NULL, queue_init, NULL, NULL, NULL,
    queue_evict, queue_remove, queue_insert, lru_end,
};

/* == LFU (optionally decayed) ======================================================= */
/* Score 1 on admission, +1 per hit; with decay d every access counts d^(age in
   steps), stored relative to d^-(t - t0) and renormalised past 1e100 exactly as
   the Python class does. Victim: lowest (score, tick); pins never enter the heap. */

typedef struct {
    double *score;
    int64_t *tick;
    int32_t *tmp;
    kheap h;
    int64_t clock, t0;
    double w, decay;
    const uint8_t *pinned;
    int32_t n_keys;
} LFU;

#define LFU_ARRAYS(s, a, c)                                                 \
    do {                                                                    \
        (s)->score = take((a), sizeof(double) * (c)->n_keys);               \
        (s)->tick = take((a), sizeof(int64_t) * (c)->n_keys);               \
        (s)->h.heap = take((a), sizeof(int32_t) * (c)->n_keys);             \
        (s)->h.pos = take((a), sizeof(int32_t) * (c)->n_keys);              \
        (s)->tmp = take((a), sizeof(int32_t) * ((c)->k + 1));               \
    } while (0)
DEFINE_SIZE_INIT(LFU, LFU_ARRAYS)

static int lfu_before(const void *sv, int32_t a, int32_t b) {
    const LFU *s = sv;
    double sa = s->score[a], sb = s->score[b];
    return sa < sb || (sa == sb && s->tick[a] < s->tick[b]);
}
static void lfu_init(void *sv, const mer_ctx *c) {
    LFU *s = sv;
    LFU_lay(s, c);
    for (int32_t i = 0; i < c->n_keys; i++) {
        s->h.pos[i] = -1;
        s->score[i] = 0.0;
        s->tick[i] = 0;
    }
    s->h.n = 0;
    s->clock = 0;
    s->t0 = 0;
    s->w = 1.0;
    s->decay = c->p[0];
    s->pinned = c->pinned;
    s->n_keys = c->n_keys;
}
static void lfu_begin(void *sv, int64_t t, const int32_t *keys, const int64_t *nu, int k) {
    LFU *s = sv;
    (void)keys;
    (void)nu;
    (void)k;
    if (s->decay < 1.0) {
        double w = pow(s->decay, (double)(s->t0 - t));
        if (w > 1e100) {
            double scale = 1.0 / w;
            for (int32_t i = 0; i < s->n_keys; i++) s->score[i] *= scale;
            for (int32_t i = s->h.n / 2 - 1; i >= 0; i--) h_down(&s->h, s, lfu_before, i);
            s->t0 = t;
            w = 1.0;
        }
        s->w = w;
    }
}
static void lfu_hit(void *sv, int32_t x) {
    LFU *s = sv;
    s->clock++;
    s->score[x] = s->score[x] + s->w;
    s->tick[x] = s->clock;
    if (s->h.pos[x] >= 0) h_down(&s->h, s, lfu_before, s->h.pos[x]);
}
static void lfu_insert(void *sv, int32_t x) {
    LFU *s = sv;
    s->clock++;
    s->score[x] = s->w;
    s->tick[x] = s->clock;
    if (!(s->pinned && s->pinned[x])) h_push(&s->h, s, lfu_before, x);
}
static void lfu_remove(void *sv, int32_t x) {
    LFU *s = sv;
    if (s->h.pos[x] >= 0) h_del(&s->h, s, lfu_before, x);
}
static int32_t lfu_evict(void *sv, const mer_prot *p) {
    LFU *s = sv;
    return h_take_first(&s->h, s, lfu_before, p, s->tmp);
}

static const mer_policy LFU_POLICY = {
    "lfu", "decay", 1, 0, LFU_size, NULL, lfu_init, lfu_begin, lfu_hit, NULL,
    lfu_evict, lfu_remove, lfu_insert, NULL,
};

/* == CLOCK ========================================================================= */
/* A circular list with the hand on the oldest key. New keys enter just behind the
   hand with bit 0; a hit sets the bit. Evicting walks the hand: protected keys
   are passed unchanged, set bits are cleared and passed, the first clear bit
   goes. This literal walk ends where the Python class's plan does. */

typedef struct {
    int32_t *prv, *nxt;
    uint8_t *bit;
    int32_t hand, n;
} Clock;

#define CLOCK_ARRAYS(s, a, c)                                               \
    do {                                                                    \
        (s)->prv = take((a), sizeof(int32_t) * (c)->n_keys);                \
        (s)->nxt = take((a), sizeof(int32_t) * (c)->n_keys);                \
        (s)->bit = take((a), (c)->n_keys);                                  \
    } while (0)
DEFINE_SIZE_INIT(Clock, CLOCK_ARRAYS)

static void clock_init(void *sv, const mer_ctx *c) {
    Clock *s = sv;
    Clock_lay(s, c);
    memset(s->bit, 0, c->n_keys);
    s->hand = -1;
    s->n = 0;
}
static void clock_hit(void *sv, int32_t x) { ((Clock *)sv)->bit[x] = 1; }
static void clock_insert(void *sv, int32_t x) {
    Clock *s = sv;
    s->bit[x] = 0;
    if (s->n == 0) {
        s->prv[x] = s->nxt[x] = x;
        s->hand = x;
    } else {
        int32_t b = s->prv[s->hand];
        s->nxt[b] = x;
        s->prv[x] = b;
        s->nxt[x] = s->hand;
        s->prv[s->hand] = x;
    }
    s->n++;
}
static void clock_remove(void *sv, int32_t x) {
    Clock *s = sv;
    if (--s->n == 0) {
        s->hand = -1;
        return;
    }
    if (s->hand == x) s->hand = s->nxt[x];
    int32_t a = s->prv[x], b = s->nxt[x];
    s->nxt[a] = b;
    s->prv[b] = a;
}
static int32_t clock_evict(void *sv, const mer_prot *p) {
    Clock *s = sv;
    if (s->n == 0) return -1;
    int32_t x = s->hand;
    for (int64_t guard = 2 * (int64_t)s->n + 1; guard > 0; guard--) {
        if (!is_prot(p, x)) {
            if (!s->bit[x]) {
                s->hand = x;
                clock_remove(s, x);
                return x;
            }
            s->bit[x] = 0;
        }
        x = s->nxt[x];
    }
    return -1;
}

static const mer_policy CLOCK_POLICY = {
    "clock", "", 1, 0, Clock_size, NULL, clock_init, NULL, clock_hit, NULL,
    clock_evict, clock_remove, clock_insert, NULL,
};

/* == SIEVE ========================================================================= */
/* A FIFO from tail (oldest) to head (newest) with visited bits; the hand walks
   from the tail towards the head clearing bits and evicts the first unvisited
   key, then rests on the next newer key (none: start at the tail next time). */

typedef struct {
    int32_t *older, *newer;
    uint8_t *vis;
    int32_t head, tail, hand, n;
} Sieve;

#define SIEVE_ARRAYS(s, a, c)                                               \
    do {                                                                    \
        (s)->older = take((a), sizeof(int32_t) * (c)->n_keys);              \
        (s)->newer = take((a), sizeof(int32_t) * (c)->n_keys);              \
        (s)->vis = take((a), (c)->n_keys);                                  \
    } while (0)
DEFINE_SIZE_INIT(Sieve, SIEVE_ARRAYS)

static void sieve_init(void *sv, const mer_ctx *c) {
    Sieve *s = sv;
    Sieve_lay(s, c);
    memset(s->vis, 0, c->n_keys);
    s->head = s->tail = s->hand = -1;
    s->n = 0;
}
static void sieve_hit(void *sv, int32_t x) { ((Sieve *)sv)->vis[x] = 1; }
static void sieve_insert(void *sv, int32_t x) {
    Sieve *s = sv;
    s->vis[x] = 0;
    s->older[x] = s->head;
    s->newer[x] = -1;
    if (s->head >= 0) s->newer[s->head] = x;
    s->head = x;
    if (s->tail < 0) s->tail = x;
    s->n++;
}
static void sieve_unlink(Sieve *s, int32_t x) {
    int32_t o = s->older[x], w = s->newer[x];
    if (o >= 0) s->newer[o] = w; else s->tail = w;
    if (w >= 0) s->older[w] = o; else s->head = o;
    s->n--;
}
static void sieve_remove(void *sv, int32_t x) {
    Sieve *s = sv;
    if (s->hand == x) s->hand = s->newer[x];
    sieve_unlink(s, x);
}
static int32_t sieve_evict(void *sv, const mer_prot *p) {
    Sieve *s = sv;
    if (s->tail < 0) return -1;
    int32_t x = s->hand >= 0 ? s->hand : s->tail;
    for (int64_t guard = 2 * (int64_t)s->n + 1;; guard--) {
        if (guard == 0) return -1; /* every key protected (the driver avoids this) */
        if (!is_prot(p, x)) {
            if (!s->vis[x]) break;
            s->vis[x] = 0;
        }
        x = s->newer[x] >= 0 ? s->newer[x] : s->tail;
    }
    s->hand = s->newer[x];
    sieve_unlink(s, x);
    return x;
}

static const mer_policy SIEVE_POLICY = {
    "sieve", "", 1, 0, Sieve_size, NULL, sieve_init, NULL, sieve_hit, NULL,
    sieve_evict, sieve_remove, sieve_insert, NULL,
};

/* -- keys in several queues (S3-FIFO, ARC): queue q's sentinel is node n_keys + q - */

typedef struct {
    int32_t *prv, *nxt;
    uint8_t *where; /* 0 none, 1 + queue */
    int32_t len[4];
    int32_t S0;
} Queues;

#define QUEUES_ARRAYS(m, a, c, nq)                                          \
    do {                                                                    \
        (m)->prv = take((a), sizeof(int32_t) * ((c)->n_keys + (nq)));       \
        (m)->nxt = take((a), sizeof(int32_t) * ((c)->n_keys + (nq)));       \
        (m)->where = take((a), (c)->n_keys);                                \
    } while (0)

static void qs_init(Queues *m, const mer_ctx *c, int nq) {
    memset(m->where, 0, c->n_keys);
    m->S0 = c->n_keys;
    for (int q = 0; q < nq; q++) {
        l_init(m->prv, m->nxt, m->S0 + q);
        m->len[q] = 0;
    }
}
static inline void qs_put(Queues *m, int q, int32_t x) {
    l_push(m->prv, m->nxt, m->S0 + q, x);
    m->where[x] = (uint8_t)(1 + q);
    m->len[q]++;
}
static inline void qs_out(Queues *m, int32_t x) {
    m->len[m->where[x] - 1]--;
    l_unlink(m->prv, m->nxt, x);
    m->where[x] = 0;
}

/* == S3-FIFO ======================================================================= */
/* Small FIFO S, main FIFO M, ghost FIFO G (keys evicted from S), a capped access
   counter. The walks move keys between the queues in place; protected keys are
   passed over and keep their places, which is where the Python class's plan
   puts them back. s_cap, m_cap and g_cap come from the Python object. */

enum { S3_S = 0, S3_M = 1, S3_G = 2 };

typedef struct {
    Queues q;
    uint8_t *freq;
    int32_t s_cap, m_cap, g_cap, thr, maxf;
} S3;

#define S3_ARRAYS(s, a, c)                                                  \
    do {                                                                    \
        QUEUES_ARRAYS(&(s)->q, a, c, 3);                                    \
        (s)->freq = take((a), (c)->n_keys);                                 \
    } while (0)
DEFINE_SIZE_INIT(S3, S3_ARRAYS)

static void s3_init(void *sv, const mer_ctx *c) {
    S3 *s = sv;
    S3_lay(s, c);
    qs_init(&s->q, c, 3);
    memset(s->freq, 0, c->n_keys);
    s->s_cap = (int32_t)c->p[0];
    s->m_cap = (int32_t)c->p[1];
    s->g_cap = (int32_t)c->p[2];
    s->thr = (int32_t)c->p[3];
    s->maxf = (int32_t)c->p[4];
}
static void s3_hit(void *sv, int32_t x) {
    S3 *s = sv;
    if (s->freq[x] < s->maxf) s->freq[x]++;
}
static void s3_insert(void *sv, int32_t x) {
    S3 *s = sv;
    s->freq[x] = 0;
    if (s->q.where[x] == 1 + S3_G) {
        qs_out(&s->q, x);
        qs_put(&s->q, S3_M, x);
    } else {
        qs_put(&s->q, S3_S, x);
    }
}
static void s3_remove(void *sv, int32_t x) { qs_out(&((S3 *)sv)->q, x); }

static int32_t s3_evict_main(S3 *s, const mer_prot *p) {
    int32_t sent = s->q.S0 + S3_M;
    int32_t x = s->q.nxt[sent];
    while (x != sent) {
        int32_t nx = s->q.nxt[x];
        if (is_prot(p, x)) {
            x = nx;
            continue;
        }
        if (s->freq[x] > 0) {
            s->freq[x]--;
            l_unlink(s->q.prv, s->q.nxt, x);
            l_push(s->q.prv, s->q.nxt, sent, x);
            x = nx == sent ? x : nx; /* the last key, moved to the back, is next again */
            continue;
        }
        qs_out(&s->q, x);
        return x;
    }
    return -1;
}
static int32_t s3_evict_small(S3 *s, const mer_prot *p) {
    int32_t sent = s->q.S0 + S3_S;
    int32_t x = s->q.nxt[sent];
    while (x != sent) {
        int32_t nx = s->q.nxt[x];
        if (is_prot(p, x)) {
            x = nx;
            continue;
        }
        if (s->freq[x] >= s->thr) {
            s->freq[x] = 0;
            qs_out(&s->q, x);
            qs_put(&s->q, S3_M, x);
            if (s->q.len[S3_M] > s->m_cap) {
                int32_t f = s3_evict_main(s, p);
                if (f >= 0) return f;
            }
            x = nx;
            continue;
        }
        qs_out(&s->q, x);
        qs_put(&s->q, S3_G, x);
        if (s->q.len[S3_G] > s->g_cap) qs_out(&s->q, s->q.nxt[s->q.S0 + S3_G]);
        return x;
    }
    return -1;
}
static int32_t s3_evict(void *sv, const mer_prot *p) {
    S3 *s = sv;
    int32_t f;
    if (s->q.len[S3_S] >= s->s_cap) {
        f = s3_evict_small(s, p);
        if (f < 0) f = s3_evict_main(s, p);
    } else {
        f = s3_evict_main(s, p);
        if (f < 0) f = s3_evict_small(s, p);
    }
    return f;
}

static const mer_policy S3FIFO_POLICY = {
    "s3fifo", "s_cap m_cap g_cap move_threshold max_freq", 1, 0, S3_size, NULL, s3_init,
    NULL, s3_hit, NULL, s3_evict, s3_remove, s3_insert, NULL,
};

/* == ARC =========================================================================== */
/* T1, T2 and their ghosts B1, B2 as four queues; p adapts on ghost hits in
   prepare_admit, REPLACE picks the list in evict, exactly as the Python class. */

enum { A_T1 = 0, A_T2 = 1, A_B1 = 2, A_B2 = 3 };

typedef struct {
    Queues q;
    int32_t c;
    double p;
    int in_b2, drop_t1;
} ARC;

#define ARC_ARRAYS(s, a, c) QUEUES_ARRAYS(&(s)->q, a, c, 4)
DEFINE_SIZE_INIT(ARC, ARC_ARRAYS)

static void arc_init(void *sv, const mer_ctx *c) {
    ARC *s = sv;
    ARC_lay(s, c);
    qs_init(&s->q, c, 4);
    s->c = c->cap;
    s->p = 0.0;
    s->in_b2 = s->drop_t1 = 0;
}
static inline void arc_pop_front(ARC *s, int q) { qs_out(&s->q, s->q.nxt[s->q.S0 + q]); }

static void arc_hit(void *sv, int32_t x) {
    ARC *s = sv;
    qs_out(&s->q, x);
    qs_put(&s->q, A_T2, x);
}
static void arc_prepare(void *sv, int32_t x) {
    ARC *s = sv;
    int32_t c = s->c;
    s->in_b2 = 0;
    s->drop_t1 = 0;
    if (s->q.where[x] == 1 + A_B1) {
        double r = (double)s->q.len[A_B2] / (double)s->q.len[A_B1];
        double np = s->p + (1.0 > r ? 1.0 : r);
        s->p = np < (double)c ? np : (double)c;
    } else if (s->q.where[x] == 1 + A_B2) {
        s->in_b2 = 1;
        double r = (double)s->q.len[A_B1] / (double)s->q.len[A_B2];
        double np = s->p - (1.0 > r ? 1.0 : r);
        s->p = np > 0.0 ? np : 0.0;
    } else {
        int32_t l1 = s->q.len[A_T1] + s->q.len[A_B1];
        if (l1 >= c) {
            if (s->q.len[A_T1] < c) {
                if (s->q.len[A_B1]) arc_pop_front(s, A_B1);
            } else {
                s->drop_t1 = 1;
            }
        } else if ((int64_t)l1 + s->q.len[A_T2] + s->q.len[A_B2] >= 2 * (int64_t)c &&
                   s->q.len[A_B2]) {
            arc_pop_front(s, A_B2);
        }
    }
}
static int32_t arc_first(ARC *s, int q, const mer_prot *p) {
    int32_t sent = s->q.S0 + q;
    for (int32_t x = s->q.nxt[sent]; x != sent; x = s->q.nxt[x])
        if (!is_prot(p, x)) return x;
    return -1;
}
static int32_t arc_evict(void *sv, const mer_prot *p) {
    ARC *s = sv;
    if (s->drop_t1) {
        int32_t x = arc_first(s, A_T1, p);
        if (x >= 0) {
            qs_out(&s->q, x);
            return x;
        }
    }
    double l1 = (double)s->q.len[A_T1];
    int from_t1 = s->q.len[A_T1] > 0 && (l1 > s->p || (s->in_b2 && l1 == s->p));
    int order[2][2] = {{A_T1, A_B1}, {A_T2, A_B2}};
    for (int i = 0; i < 2; i++) {
        int j = from_t1 ? i : 1 - i;
        int32_t x = arc_first(s, order[j][0], p);
        if (x >= 0) {
            qs_out(&s->q, x);
            qs_put(&s->q, order[j][1], x);
            return x;
        }
    }
    return -1;
}
static void arc_remove(void *sv, int32_t x) { qs_out(&((ARC *)sv)->q, x); }
static void arc_insert(void *sv, int32_t x) {
    ARC *s = sv;
    if (s->q.where[x] == 1 + A_B1 || s->q.where[x] == 1 + A_B2) qs_out(&s->q, x), qs_put(&s->q, A_T2, x);
    else qs_put(&s->q, A_T1, x);
    int64_t c = s->c;
    while (s->q.len[A_T1] + s->q.len[A_B1] > c && s->q.len[A_B1]) arc_pop_front(s, A_B1);
    while ((int64_t)s->q.len[A_T1] + s->q.len[A_T2] + s->q.len[A_B1] + s->q.len[A_B2] > 2 * c &&
           s->q.len[A_B2])
        arc_pop_front(s, A_B2);
}

static const mer_policy ARC_POLICY = {
    "arc", "", 1, 0, ARC_size, NULL, arc_init, NULL, arc_hit, arc_prepare,
    arc_evict, arc_remove, arc_insert, NULL,
};

/* == OPT (Belady) ================================================================== */
/* Victim: the resident key with the farthest next use (a flat position t*k+rank,
   INF if never again), ties among the never-again keys to the largest key. The
   driver passes each lookup's next use to begin. Pins never enter the heap. */

typedef struct {
    int64_t *nv;
    int32_t *tmp;
    kheap h;
    const uint8_t *pinned;
} OPT;

#define OPT_ARRAYS(s, a, c)                                                 \
    do {                                                                    \
        (s)->nv = take((a), sizeof(int64_t) * (c)->n_keys);                 \
        (s)->h.heap = take((a), sizeof(int32_t) * (c)->n_keys);             \
        (s)->h.pos = take((a), sizeof(int32_t) * (c)->n_keys);              \
        (s)->tmp = take((a), sizeof(int32_t) * ((c)->k + 1));               \
    } while (0)
DEFINE_SIZE_INIT(OPT, OPT_ARRAYS)

static int opt_before(const void *sv, int32_t a, int32_t b) {
    const OPT *s = sv;
    return s->nv[a] > s->nv[b] || (s->nv[a] == s->nv[b] && a > b);
}
static void opt_init(void *sv, const mer_ctx *c) {
    OPT *s = sv;
    OPT_lay(s, c);
    for (int32_t i = 0; i < c->n_keys; i++) {
        s->h.pos[i] = -1;
        s->nv[i] = INF_POS;
    }
    s->h.n = 0;
    s->pinned = c->pinned;
}
static void opt_begin(void *sv, int64_t t, const int32_t *keys, const int64_t *nu, int k) {
    OPT *s = sv;
    (void)t;
    for (int r = 0; r < k; r++) {
        int32_t x = keys[r];
        s->nv[x] = nu[r];
        if (s->h.pos[x] >= 0) h_fix(&s->h, s, opt_before, x);
    }
}
static void opt_insert(void *sv, int32_t x) {
    OPT *s = sv;
    if (!(s->pinned && s->pinned[x])) h_push(&s->h, s, opt_before, x);
}
static void opt_remove(void *sv, int32_t x) {
    OPT *s = sv;
    if (s->h.pos[x] >= 0) h_del(&s->h, s, opt_before, x);
}
static int32_t opt_evict(void *sv, const mer_prot *p) {
    OPT *s = sv;
    return h_take_first(&s->h, s, opt_before, p, s->tmp);
}

static const mer_policy OPT_POLICY = {
    "opt", "", 1, 1, OPT_size, NULL, opt_init, opt_begin, NULL, NULL,
    opt_evict, opt_remove, opt_insert, NULL,
};

/* == seed-lru-locality (the public engine's) ======================================= */
/* One LRU (hits refresh in lookup order, no end-of-step order) whose victim is
   the oldest key outside the locality-pinned set: the first (cap - 1) hot ids
   of a sliding window, by count descending then id ascending. The window and
   its counts depend on the trace only, so one shared block serves every cache
   of a pass; each cache cuts the order at its own cap - 1. Not step-protecting:
   a miss may evict a key of its own step.

   O(1) evictions: each cache keeps only its unpinned residents in the recency
   list (oldest first), so the victim is the list's head; pinned residents stay
   outside it with their last-use stamp, and rejoin at their stamp's place when
   they lose their pin. The shared block keeps every key in count buckets
   (order[] by count descending; bucket c is order[gt[c] .. gt[c - 1]), gt[c] =
   keys with count > c), so a count change is one swap. A cache's pinned set is
   then "count > cstar, or count == cstar and id <= idcut", with the cut bucket
   cstar found from gt[] and idcut the right rank among its ids. After a step
   only keys whose count moved, or whose count lies between the old and the new
   cstar, can change side: `begin` re-checks exactly those, and most steps (the
   cut unmoved, no count change near it) none. A full window's step changes only
   the net counts (a key that enters and leaves is left alone). */

typedef struct {
    int32_t *ring;
    int32_t *counts; /* window count of every key */
    int32_t *order, *pos; /* keys by count, descending (not sorted within a count) */
    int32_t *gt;     /* gt[c]: keys with count > c; gt[w + 1] = 0 */
    int32_t *moved;  /* keys whose count changed in this step, */
    int32_t *mlo;    /* and the lower of the two counts of each change */
    int32_t *tmp;    /* a bucket's ids, to rank them */
    int32_t n_moved;
    int32_t n_hot;   /* keys with count >= hot_min */
    int64_t hot_min; /* ceil(max(fraction * window length, 1)) */
    int64_t wsize, wlen, whead;
    int64_t last_t;
    double fraction;
    int32_t n_keys;
    int full; /* hot_min is final */
    int ready;
} SeedShared;

typedef struct {
    int32_t *prv, *nxt; /* the unpinned residents, oldest first */
    int64_t *used;      /* last-use stamp of every resident */
    uint8_t *where;     /* SEED_OUT, SEED_LIST, SEED_HELD or SEED_STATIC */
    const uint8_t *pinned;
    int64_t clock;
    int32_t S, n_pin;
    int32_t cstar, idcut; /* pinned: count > cstar, or == cstar and id <= idcut */
    int32_t rcut;         /* how many of bucket cstar's ids are pinned */
    int32_t cut;          /* how many keys are pinned: min(hot keys, cap - 1) */
    SeedShared *sh;
} Seed;

/* where[x]: not resident, in the list (unpinned), pinned resident, static pin */
enum { SEED_OUT = 0, SEED_LIST = 1, SEED_HELD = 2, SEED_STATIC = 3 };

#define SEED_ARRAYS(s, a, c)                                                \
    do {                                                                    \
        (s)->prv = take((a), sizeof(int32_t) * ((c)->n_keys + 1));          \
        (s)->nxt = take((a), sizeof(int32_t) * ((c)->n_keys + 1));          \
        (s)->used = take((a), sizeof(int64_t) * (c)->n_keys);               \
        (s)->where = take((a), (c)->n_keys);                                \
    } while (0)
DEFINE_SIZE_INIT(Seed, SEED_ARRAYS)

static size_t seed_shared_size(const mer_ctx *c) {
    int64_t w = (int64_t)c->p[0];
    if (w < 1) w = 1;
    return sizeof(SeedShared) + 16 * 8 + sizeof(int32_t) * (size_t)w +
           4 * sizeof(int32_t) * (size_t)c->n_keys + sizeof(int32_t) * (size_t)(w + 2) +
           2 * sizeof(int32_t) * 2 * (size_t)c->k;
}
static void seed_shared_init(SeedShared *sh, const mer_ctx *c) {
    arena a = {(char *)sh, sizeof(SeedShared)};
    int64_t w = (int64_t)c->p[0];
    if (w < 1) w = 1;
    sh->ring = take(&a, sizeof(int32_t) * (size_t)w);
    sh->counts = take(&a, sizeof(int32_t) * c->n_keys);
    sh->order = take(&a, sizeof(int32_t) * c->n_keys);
    sh->pos = take(&a, sizeof(int32_t) * c->n_keys);
    sh->tmp = take(&a, sizeof(int32_t) * c->n_keys);
    sh->gt = take(&a, sizeof(int32_t) * (size_t)(w + 2));
    sh->moved = take(&a, sizeof(int32_t) * 2 * (size_t)c->k);
    sh->mlo = take(&a, sizeof(int32_t) * 2 * (size_t)c->k);
    memset(sh->counts, 0, sizeof(int32_t) * c->n_keys);
    memset(sh->gt, 0, sizeof(int32_t) * (size_t)(w + 2));
    for (int32_t i = 0; i < c->n_keys; i++) sh->order[i] = sh->pos[i] = i;
    sh->n_moved = sh->n_hot = 0;
    sh->hot_min = 1;
    sh->wsize = w;
    sh->wlen = sh->whead = 0;
    sh->last_t = INT64_MIN;
    sh->fraction = c->p[1];
    sh->n_keys = c->n_keys;
    sh->ready = 1;
}
static void seed_init(void *sv, const mer_ctx *c) {
    Seed *s = sv;
    Seed_lay(s, c);
    for (int32_t i = 0; i < c->n_keys; i++) s->prv[i] = s->nxt[i] = -1;
    memset(s->where, SEED_OUT, c->n_keys);
    s->S = c->n_keys;
    l_init(s->prv, s->nxt, s->S);
    s->pinned = c->pinned;
    s->clock = 0;
    s->n_pin = c->cap - 1 > 0 ? c->cap - 1 : 0;
    s->sh = c->shared;
    if (!s->sh->ready) seed_shared_init(s->sh, c);
    s->cstar = (int32_t)(s->sh->wsize + 1); /* nothing pinned */
    s->idcut = -1;
    s->rcut = 0;
    s->cut = 0;
}
/* count[x] +/- 1: x trades places with the first key of its bucket (+1: the bucket
   then starts one place later) or with the last (-1: its bucket then starts there).
   The arrays come as restrict locals: with -fno-strict-aliasing every store through
   a pointer read from *sh would otherwise make the compiler read the others again. */
MER_INLINE int32_t seed_count(int32_t *restrict counts, int32_t *restrict order,
                              int32_t *restrict pos, int32_t *restrict gt, int32_t x, int up) {
    int32_t i = pos[x], j, lo; /* lo: the lower of the old and the new count */
    if (up) {
        lo = counts[x]++;
        j = gt[lo]++;
    } else {
        lo = --counts[x];
        j = --gt[lo];
    }
    int32_t y = order[j];
    order[i] = y;
    pos[y] = i;
    order[j] = x;
    pos[x] = j;
    return lo;
}
static inline void seed_up(SeedShared *sh, int32_t x) {
    sh->mlo[sh->n_moved] = seed_count(sh->counts, sh->order, sh->pos, sh->gt, x, 1);
    sh->moved[sh->n_moved++] = x;
}
static inline void seed_down(SeedShared *sh, int32_t x) {
    sh->mlo[sh->n_moved] = seed_count(sh->counts, sh->order, sh->pos, sh->gt, x, 0);
    sh->moved[sh->n_moved++] = x;
}
MER_INLINE void seed_window(SeedShared *sh, const int32_t *keys, int k) {
    sh->n_moved = 0;
    if (sh->wlen == sh->wsize && sh->wsize >= k && k <= 32) {
        /* full: the step's keys replace the k oldest. Only the net count changes
           matter (the pinned set is read after the whole step), so a key that
           both enters and leaves is left alone. */
        int32_t *restrict counts = sh->counts, *restrict order = sh->order;
        int32_t *restrict pos = sh->pos, *restrict gt = sh->gt;
        int32_t *restrict moved = sh->moved, *restrict mlo = sh->mlo, *restrict ring = sh->ring;
        int32_t nm = 0;
        int64_t wh = sh->whead;
        const int64_t ws = sh->wsize;
        if (k == 2 && !((ws | wh) & 1)) {
            /* the common shape, without a branch on which keys coincide: both keys
               up, both oldest down. A key both in and out goes up and back down,
               which ends at its count (its place within its bucket may change,
               which no decision reads) and is listed twice among the moved. */
            const int32_t i0 = keys[0], i1 = keys[1], o0 = ring[wh], o1 = ring[wh + 1];
            ring[wh] = i0;
            ring[wh + 1] = i1;
            wh += 2;
            sh->whead = wh == ws ? 0 : wh;
            mlo[0] = seed_count(counts, order, pos, gt, i0, 1);
            mlo[1] = seed_count(counts, order, pos, gt, i1, 1);
            mlo[2] = seed_count(counts, order, pos, gt, o0, 0);
            mlo[3] = seed_count(counts, order, pos, gt, o1, 0);
            moved[0] = i0;
            moved[1] = i1;
            moved[2] = o0;
            moved[3] = o1;
            sh->n_moved = 4;
            sh->n_hot = gt[sh->hot_min - 1];
            return;
        }
        uint32_t left = 0; /* bit r: the r-th oldest still has to leave */
        int32_t out[32];
        for (int r = 0; r < k; r++) {
            out[r] = ring[wh];
            ring[wh] = keys[r];
            if (++wh == ws) wh = 0;
            left |= 1u << r;
        }
        sh->whead = wh;
        for (int r = 0; r < k; r++) {
            int32_t x = keys[r];
            uint32_t same = 0;
            for (int q = 0; q < k; q++) same |= (uint32_t)(out[q] == x) << q;
            same &= left;
            if (same) {
                left &= ~(same & -same);
            } else {
                mlo[nm] = seed_count(counts, order, pos, gt, x, 1);
                moved[nm++] = x;
            }
        }
        for (int q = 0; q < k; q++)
            if (left >> q & 1u) {
                mlo[nm] = seed_count(counts, order, pos, gt, out[q], 0);
                moved[nm++] = out[q];
            }
        sh->n_moved = nm;
        sh->n_hot = gt[sh->hot_min - 1];
        return;
    }
    for (int r = 0; r < k; r++) {
        int32_t x = keys[r];
        seed_up(sh, x);
        if (sh->wlen < sh->wsize) {
            sh->ring[(sh->whead + sh->wlen) % sh->wsize] = x;
            sh->wlen++;
        } else {
            seed_down(sh, sh->ring[sh->whead]);
            sh->ring[sh->whead] = x;
            if (++sh->whead == sh->wsize) sh->whead = 0;
        }
    }
    /* hot: count >= max(fraction * window length, 1), i.e. count >= its ceiling
       (which only moves while the window fills) */
    if (sh->wlen == sh->wsize && sh->full) {
        sh->n_hot = sh->gt[sh->hot_min - 1];
        return;
    }
    sh->full = sh->wlen == sh->wsize;
    double thr = sh->fraction * (double)sh->wlen;
    if (thr < 1.0) thr = 1.0;
    double m = ceil(thr);
    sh->hot_min = m > (double)(sh->wsize + 1) ? sh->wsize + 1 : (int64_t)m;
    sh->n_hot = sh->gt[sh->hot_min - 1];
}
static inline int seed_is_pinned(const Seed *s, int32_t x) {
    int32_t c = s->sh->counts[x];
    return (c > s->cstar) | ((c == s->cstar) & (x <= s->idcut));
}
/* The r-th smallest (1-based) of a[0..n), n >= r >= 1: quickselect, a is reordered. */
static int32_t seed_select(int32_t *a, int32_t n, int32_t r) {
    int32_t lo = 0, hi = n - 1, want = r - 1;
    while (lo < hi) {
        int32_t pivot = a[lo + (hi - lo) / 2], i = lo, j = hi;
        while (i <= j) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i <= j) {
                int32_t t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        if (want <= j) hi = j;
        else if (want >= i) lo = i;
        else return a[want];
    }
    return a[want];
}
/* x leaves the list (now pinned) or rejoins it at its stamp's place (now unpinned),
   searching from both ends: the list is in stamp order */
static void seed_move(Seed *s, int32_t x, uint8_t want) {
    s->where[x] = want;
    if (want == SEED_HELD) {
        l_unlink(s->prv, s->nxt, x);
        return;
    }
    const int64_t u = s->used[x];
    int32_t a = s->nxt[s->S], b = s->prv[s->S];
    for (;;) {
        if (b == s->S || s->used[b] < u) { /* after b */
            l_push(s->prv, s->nxt, s->nxt[b], x);
            return;
        }
        if (s->used[a] > u) { /* before a */
            l_push(s->prv, s->nxt, a, x);
            return;
        }
        a = s->nxt[a];
        b = s->prv[b];
    }
}
/* x to the side the cut puts it on (if resident and not statically pinned) */
static inline void seed_place(Seed *s, int32_t x) {
    uint8_t w = s->where[x];
    uint8_t want = (uint8_t)(SEED_LIST + seed_is_pinned(s, x)); /* LIST or HELD */
    if (((unsigned)(w - SEED_LIST) < 2u) & (w != want)) seed_move(s, x, want);
}
MER_INLINE void seed_begin(void *sv, int64_t t, const int32_t *keys, const int64_t *nu, int k) {
    Seed *s = sv;
    SeedShared *sh = s->sh;
    const int32_t *gt = sh->gt;
    (void)nu;
    if (sh->last_t != t) { /* the first cache of this pass to see step t */
        sh->last_t = t;
        seed_window(sh, keys, k);
    }
    const int32_t none = (int32_t)(sh->wsize + 1);
    int32_t cut = sh->n_hot < s->n_pin ? sh->n_hot : s->n_pin;
    int32_t old = s->cstar, c = none, r = 0;
    /* Most steps: the same cut, and no count change from or to the cut bucket's
       count or the one below. Then gt[old] and gt[old - 1] are unchanged, so are
       the bucket and the rank found below, and no key changes side. */
    int quiet = cut == s->cut;
    for (int32_t i = 0; i < sh->n_moved; i++) quiet &= (uint32_t)(old - sh->mlo[i]) > 1u;
    if (quiet) return;
    s->cut = cut;
    if (cut > 0) { /* the bucket of the cut's last key: gt[c] < cut <= gt[c - 1] */
        c = old < none ? old : (int32_t)sh->hot_min;
        while (gt[c] >= cut) c++;
        while (gt[c - 1] < cut) c--;
        r = cut - gt[c];
    }
    /* The cut stays where it was if its bucket, its rank there and the bucket's keys
       are the same. Only a count change from or to c can change the bucket's keys
       (a change is one step of 1: from lo to lo + 1 or back); if none does, no key
       crossed the bucket either: then no key changes side. */
    int same = (c == old) & (r == s->rcut);
    for (int32_t i = 0; i < sh->n_moved; i++) same &= (uint32_t)(c - sh->mlo[i]) > 1u;
    if (same) return;
    s->cstar = c;
    s->rcut = r;
    if (cut > 0) {
        int32_t n = gt[c - 1] - gt[c];
        if (r == n) {
            s->idcut = INT32_MAX;
        } else {
            memcpy(sh->tmp, sh->order + gt[c], sizeof(int32_t) * (size_t)n);
            s->idcut = seed_select(sh->tmp, n, r);
        }
    }
    /* keys with a count between the old and the new cut bucket: one run of order[] */
    int32_t clo = old < c ? old : c, chi = old < c ? c : old;
    int32_t end = clo >= 1 ? gt[clo - 1] : sh->n_keys;
    if (clo < none)
        for (int32_t i = gt[chi]; i < end; i++) seed_place(s, sh->order[i]);
    for (int32_t i = 0; i < sh->n_moved; i++) seed_place(s, sh->moved[i]);
}
MER_INLINE void seed_hit(void *sv, int32_t x) {
    Seed *s = sv;
    s->used[x] = ++s->clock;
    if (s->where[x] == SEED_LIST) {
        l_unlink(s->prv, s->nxt, x);
        l_push(s->prv, s->nxt, s->S, x);
    }
}
MER_INLINE int32_t seed_evict(void *sv, const mer_prot *p) {
    Seed *s = sv;
    (void)p; /* static pins never enter the list, and the step is not protected */
    int32_t x = s->nxt[s->S];
    if (x == s->S) return -1;
    l_unlink(s->prv, s->nxt, x);
    s->where[x] = SEED_OUT;
    return x;
}
MER_INLINE void seed_insert(void *sv, int32_t x) {
    Seed *s = sv;
    s->used[x] = ++s->clock;
    if (s->pinned && s->pinned[x]) {
        s->where[x] = SEED_STATIC;
    } else if (seed_is_pinned(s, x)) {
        s->where[x] = SEED_HELD;
    } else {
        s->where[x] = SEED_LIST;
        l_push(s->prv, s->nxt, s->S, x);
    }
}
static void seed_remove(void *sv, int32_t x) {
    Seed *s = sv;
    if (s->where[x] == SEED_LIST) l_unlink(s->prv, s->nxt, x);
    s->where[x] = SEED_OUT;
}

static const mer_policy SEED_POLICY = {
    "seed-lru-locality", "window_size fraction", 0, 0, Seed_size, seed_shared_size, seed_init,
    seed_begin, seed_hit, NULL, seed_evict, seed_remove, seed_insert, NULL,
};

/* == cycle: hit density over the layer cycle (mer/core/cycle.py) ==================== */
/* The features and p of every key depend on the trace only, so one shared block
   serves every cache of a pass (all caches of a pass share the weights); each
   cache keeps its residents, its LRU order and the duel's two shadow directories.
   Keys are local (0..n_keys-1, n_keys = local layers x E); the global layer of
   local key x is (x + key_base) / E. Floating-point expressions are written in
   the Python class's order, without contraction, so both give the same bits. */

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

#define CY_NW 7
#define CY_EPS 0.01
#define CY_GAP_CAP 1000

/* z is first known only within bounds [zlo, zhi] (cy_bound: the logarithms from a table,
   no libm call), and exactly (zlo == zhi, cy_exact: libm, the Python class's bits) only
   where the bounds cannot settle a comparison. Every decision is the one the exact
   values give (see cy_layer_cand, cycle_best). */
#define CY_LOGT_BITS 8   /* buckets an octave */
#define CY_LOGT_E0 (-7)  /* the octaves [2^-7, 2): every y (an average or a rate, + CY_EPS) */
#define CY_LOGT_N ((1 - CY_LOGT_E0) << CY_LOGT_BITS)
#define CY_LOG_MARGIN 1e-9 /* >> libm's error (< 1 ulp) and the rounding of the bound */
#define CY_WMAX 1e100     /* |weights| above this (or not finite): exact values only */
#define CY_LN2 0.6931471805599453

typedef struct {
    double *el, *em, *es, *invd; /* invd[d]: log d */
    double *zlo, *zhi; /* bounds of the log-odds z (equal once exact) */
    double *logt;  /* logt[j]: below log of bucket j's lower end (cy_logb), j = 0..CY_LOGT_N */
    double *l1p;   /* l1p[g] = log1p(g), g = 0..CY_GAP_CAP: libm's own values */
    double *rot;   /* rot[i] = log d for d = (i - 1) mod L + 1: layer ll's log d is
                      rot[L + layer0 - cur + ll], one slice for all layers */
    double *rep, *rcount; /* transition counts (whole numbers, exact in a double) */
    double *linv;  /* per layer, per rank of its latest visit: 1 / (rcount + prior) */
    int64_t *last, *visits;
    uint8_t *pok;  /* z of x since its layer's latest visit: 0 unknown, 1 bounds, 2 exact */
    uint64_t *pinmask; /* per local layer: its static pins (bit e), when E <= 64 */
    uint64_t stepmask; /* the current step's keys (bits of its layer) */
    int bits;          /* E <= 64: layers' keys as bit masks (else the byte scans) */
    int32_t *kl;   /* local layer of every key */
    int32_t *latest; /* k per local layer */
    int32_t *n_latest;
    int32_t *xs;   /* a layer's eligible residents, in key order (one search) */
    double *vlo;   /* per layer: a lower bound of its candidate's z - log d (one search) */
    double w[CY_NW], rl, rm, rs, prior;
    int exact_only; /* weights beyond CY_WMAX: no bounds (cycle_best_literal) */
    int lean;       /* only the default terms, with positive weights (cy_bound) */
    double pk, inv_k; /* prior k / E and 1 / k, as cy_p's expressions compute them */
    int32_t n_keys, E, L, nl, layer0;
    int k, started, ready;
    int64_t last_t;
    int32_t cur; /* global layer of the current step */
} CycleShared;

typedef struct {
    uint8_t *res;    /* residents */
    uint64_t *rmask; /* per local layer: its residents (bit e), when E <= 64 */
    int32_t *cand;   /* per local layer: its victim candidate (-1 none), while clean, */
    double *clo, *chi; /* and bounds of the candidate's z (+inf: none) */
    uint64_t *dirty; /* bit per local layer: cand must be recomputed */
} CySet;

typedef struct {
    CySet real, shadow; /* the cache, and the duel's shadow of this policy */
    uint8_t *lin;       /* the duel's shadow LRU: members */
    int32_t *prv, *nxt, *sprv, *snxt;
    int32_t S, cap, n_sres, n_lin;
    int duel, lru_mode;
    double decay, hl, hc;
    CycleShared *sh;
} Cycle;

/* The geometry of the layer-aware policies (cycle, cotoken): parameter i as a count of
   at least 1 (n_layers, n_experts), and the layers a partition of n_keys keys holds. */
static int32_t geo_param(const mer_ctx *c, int i) {
    int32_t v = (int32_t)c->p[i];
    return v > 0 ? v : 1;
}
static int32_t geo_layers_held(const mer_ctx *c, int32_t E) {
    return c->n_keys / E > 0 ? c->n_keys / E : 1;
}

/* params: w0..w6 rate_long rate_mid rate_short prior duel duel_decay n_layers n_experts */
static int32_t cy_E(const mer_ctx *c) { return geo_param(c, CY_NW + 7); }
static int32_t cy_nl(const mer_ctx *c) { return geo_layers_held(c, cy_E(c)); }
static int32_t cy_L(const mer_ctx *c) { return geo_param(c, CY_NW + 6); }

/* words of a bit per layer (layers <= n_keys) */
#define CY_WORDS(c) ((size_t)((c)->n_keys + 63) / 64)
#define CYCLE_ARRAYS(s, a, c)                                               \
    do {                                                                    \
        /* per-layer arrays sized by n_keys (>= layers): no parameter read here */ \
        (s)->real.res = take((a), (c)->n_keys);                             \
        (s)->real.rmask = take((a), sizeof(uint64_t) * (c)->n_keys);        \
        (s)->real.cand = take((a), sizeof(int32_t) * (c)->n_keys);          \
        (s)->real.clo = take((a), sizeof(double) * (c)->n_keys);            \
        (s)->real.chi = take((a), sizeof(double) * (c)->n_keys);            \
        (s)->real.dirty = take((a), sizeof(uint64_t) * CY_WORDS(c));        \
        (s)->shadow.res = take((a), (c)->n_keys);                           \
        (s)->shadow.rmask = take((a), sizeof(uint64_t) * (c)->n_keys);      \
        (s)->shadow.cand = take((a), sizeof(int32_t) * (c)->n_keys);        \
        (s)->shadow.clo = take((a), sizeof(double) * (c)->n_keys);          \
        (s)->shadow.chi = take((a), sizeof(double) * (c)->n_keys);          \
        (s)->shadow.dirty = take((a), sizeof(uint64_t) * CY_WORDS(c));      \
        (s)->lin = take((a), (c)->n_keys);                                  \
        (s)->prv = take((a), sizeof(int32_t) * ((c)->n_keys + 1));          \
        (s)->nxt = take((a), sizeof(int32_t) * ((c)->n_keys + 1));          \
        (s)->sprv = take((a), sizeof(int32_t) * ((c)->n_keys + 1));         \
        (s)->snxt = take((a), sizeof(int32_t) * ((c)->n_keys + 1));         \
    } while (0)
DEFINE_SIZE_INIT(Cycle, CYCLE_ARRAYS)

/* The shared block's arrays, laid out once for its size and once for its init. */
#define CYCLE_SHARED_ARRAYS(sh, a, c)                                                \
    do {                                                                             \
        size_t nk_ = (size_t)(c)->n_keys, nl_ = (size_t)cy_nl(c);                    \
        size_t E_ = (size_t)cy_E(c), k_ = (size_t)(c)->k;                            \
        size_t L_ = (size_t)(cy_L(c) > cy_nl(c) ? cy_L(c) : cy_nl(c));               \
        (sh)->el = take((a), sizeof(double) * nk_);                                  \
        (sh)->em = take((a), sizeof(double) * nk_);                                  \
        (sh)->es = take((a), sizeof(double) * nk_);                                  \
        (sh)->zlo = take((a), sizeof(double) * nk_);                                 \
        (sh)->zhi = take((a), sizeof(double) * nk_);                                 \
        (sh)->logt = take((a), sizeof(double) * (CY_LOGT_N + 1));                    \
        (sh)->l1p = take((a), sizeof(double) * (CY_GAP_CAP + 1));                    \
        (sh)->xs = take((a), sizeof(int32_t) * E_);                                  \
        (sh)->vlo = take((a), sizeof(double) * nl_);                                 \
        (sh)->linv = take((a), sizeof(double) * nl_ * k_);                           \
        (sh)->rot = take((a), sizeof(double) * (3 * L_ + 1));                        \
        (sh)->pok = take((a), nk_);                                                  \
        (sh)->pinmask = take((a), sizeof(uint64_t) * nl_);                           \
        (sh)->kl = take((a), sizeof(int32_t) * nk_);                                 \
        (sh)->invd = take((a), sizeof(double) * (L_ + 1));                           \
        (sh)->last = take((a), sizeof(int64_t) * nk_);                               \
        (sh)->rcount = take((a), sizeof(double) * nk_);                              \
        (sh)->visits = take((a), sizeof(int64_t) * nl_);                             \
        (sh)->rep = take((a), sizeof(double) * nl_ * E_ * E_);                       \
        (sh)->latest = take((a), sizeof(int32_t) * nl_ * k_);                        \
        (sh)->n_latest = take((a), sizeof(int32_t) * nl_);                           \
    } while (0)
DEFINE_SIZE_INIT(CycleShared, CYCLE_SHARED_ARRAYS)

static size_t cycle_shared_size(const mer_ctx *c) { return CycleShared_size(c); }
static void cycle_shared_init(CycleShared *sh, const mer_ctx *c) {
    CycleShared_lay(sh, c);
    int32_t nk = c->n_keys, E = cy_E(c), nl = cy_nl(c);
    for (int i = 0; i < CY_NW; i++) sh->w[i] = c->p[i];
    sh->rl = c->p[CY_NW];
    sh->rm = c->p[CY_NW + 1];
    sh->rs = c->p[CY_NW + 2];
    sh->prior = c->p[CY_NW + 3];
    sh->L = cy_L(c) > nl ? cy_L(c) : nl; /* a partition never holds more layers than L */
    sh->invd[0] = 0.0;
    for (int32_t d = 1; d <= sh->L; d++) sh->invd[d] = log((double)d);
    for (int32_t i = 0; i <= 3 * sh->L; i++) sh->rot[i] = i ? sh->invd[(i - 1) % sh->L + 1] : 0.0;
    for (int32_t j = 0; j <= CY_LOGT_N; j++) {
        const int32_t e = CY_LOGT_E0 + (j >> CY_LOGT_BITS), i = j & ((1 << CY_LOGT_BITS) - 1);
        const double m = 1.0 + (double)i / (double)(1 << CY_LOGT_BITS); /* exact */
        sh->logt[j] = ((double)e * CY_LN2 + log(m)) - CY_LOG_MARGIN;
    }
    for (int32_t g = 0; g <= CY_GAP_CAP; g++) sh->l1p[g] = log1p((double)g);
    sh->exact_only = 0;
    for (int i = 0; i < CY_NW; i++)
        if (!(fabs(sh->w[i]) <= CY_WMAX)) sh->exact_only = 1; /* also NaN */
    if (!isfinite(sh->prior)) sh->exact_only = 1;
    sh->lean = !sh->exact_only && sh->w[1] == 0.0 && sh->w[3] == 0.0 && sh->w[5] == 0.0 &&
               sh->w[2] > 0.0 && sh->w[4] != 0.0 && sh->w[6] > 0.0;

    sh->E = E;
    sh->nl = nl;
    sh->n_keys = nk;
    sh->layer0 = c->key_base / E;
    sh->k = c->k;
    sh->pk = sh->prior * ((double)sh->k / (double)E);
    sh->inv_k = 1.0 / (double)sh->k;
    for (int32_t i = 0; i < nk; i++) {
        sh->last[i] = -1;
        sh->rcount[i] = 0.0;
        sh->el[i] = sh->em[i] = sh->es[i] = sh->zlo[i] = sh->zhi[i] = 0.0;
        sh->pok[i] = 0;
        sh->kl[i] = i / E < nl ? i / E : nl - 1;
    }
    sh->bits = E <= 64;
    sh->stepmask = 0;
    for (int32_t ll = 0; ll < nl; ll++) {
        uint64_t m = 0;
        for (int32_t e = 0; e < E && e < 64; e++)
            if (c->pinned && c->pinned[ll * E + e]) m |= (uint64_t)1 << e;
        sh->pinmask[ll] = m;
    }
    memset(sh->visits, 0, sizeof(int64_t) * nl);
    for (size_t i = 0; i < (size_t)nl * E * E; i++) sh->rep[i] = 0.0;
    for (size_t i = 0; i < (size_t)nl * c->k; i++) sh->linv[i] = 0.0;
    memset(sh->n_latest, 0, sizeof(int32_t) * nl);
    sh->started = 0;
    sh->last_t = INT64_MIN;
    sh->cur = sh->layer0;
    sh->ready = 1;
}
static inline double cy_prob(const CycleShared *sh, double el, double em, double es,
                             double used, int64_t gap, double rep) {
    /* terms with weight 0 are skipped, exactly as in Python (they would add 0.0) */
    const double *w = sh->w;
    double z = w[0];
    if (w[1] != 0.0) z += w[1] * log(el + CY_EPS);
    if (w[2] != 0.0) z += w[2] * log(em + CY_EPS);
    if (w[3] != 0.0) z += w[3] * log(es + CY_EPS);
    if (w[4] != 0.0) z += w[4] * used;
    if (w[5] != 0.0) z += w[5] * log1p((double)gap);
    if (w[6] != 0.0) z += w[6] * log(rep + CY_EPS);
    return z; /* the log-odds of a pick: the rule needs no sigmoid */
}
/* The Python class's `(1 - rate) * x + rate * picked` over a layer's experts: rate * 0.0
   adds +0.0 to a product >= +0 (the averages never go negative), and rate * 1.0 is rate,
   so scaling every expert and then adding rate to the picked ones gives the same bits
   without an indicator array (a step's keys are distinct: the driver refuses others). */
MER_INLINE void cy_ema(double *restrict x, const int32_t E, double rate, const int32_t *loc,
                       const int n) {
    const double c = 1.0 - rate;
    for (int32_t e = 0; e < E; e++) x[e] = c * x[e];
    for (int r = 0; r < n; r++) x[loc[r]] = x[loc[r]] + rate;
}
/* One visit of a layer: its transition counts, averages, gaps and repeat rates, as
   the Python class's begin_step computes them (same expressions, same order). An
   input that only a weight-0 term reads (an average, the repeat rate) is not
   updated: z never reads it. Written once for E a constant (8, Mixtral's) and once
   for any E, so that the loops over a layer's experts unroll where they can. */
static void cycle_start(CycleShared *sh, int k) {
    const int32_t E = sh->E;
    double base = (double)k / (double)E;
    double p0 = cy_prob(sh, base, base, base, 0.0, CY_GAP_CAP, base);
    for (int32_t i = 0; i < sh->n_keys; i++) {
        sh->el[i] = sh->em[i] = sh->es[i] = base;
        sh->zlo[i] = sh->zhi[i] = p0;
        sh->pok[i] = 2;
    }
    sh->started = 1;
}
MER_INLINE void cy_features_e(CycleShared *sh, const int32_t *keys, const int k, const int32_t E) {
    const double *w = sh->w;
    const int32_t ll = sh->kl[keys[0]], b0 = ll * E;
    int32_t *restrict lat = sh->latest + (size_t)ll * k;
    int32_t loc[k];
    double *restrict rep = sh->rep, *restrict rcount = sh->rcount;
    for (int r = 0; r < k; r++) loc[r] = keys[r] - b0;
    const int n_lat = sh->n_latest[ll];
    if (n_lat == k) {
        for (int i = 0; i < k; i++) {
            const int32_t a = lat[i];
            rcount[b0 + a] += 1.0;
            double *row = rep + ((size_t)b0 + a) * E;
            for (int r = 0; r < k; r++) row[loc[r]] += 1.0;
        }
    } else {
        for (int i = 0; i < n_lat; i++) {
            const int32_t a = lat[i];
            rcount[b0 + a] += 1.0;
            double *row = rep + ((size_t)b0 + a) * E;
            for (int r = 0; r < k; r++) row[loc[r]] += 1.0;
        }
    }
    for (int r = 0; r < k; r++) lat[r] = loc[r];
    sh->n_latest[ll] = k;
    const int64_t v = ++sh->visits[ll];
    if (w[1] != 0.0) cy_ema(sh->el + b0, E, sh->rl, loc, k);
    if (w[2] != 0.0) cy_ema(sh->em + b0, E, sh->rm, loc, k);
    if (w[3] != 0.0) cy_ema(sh->es + b0, E, sh->rs, loc, k);
    int64_t *restrict last = sh->last;
    for (int r = 0; r < k; r++) last[b0 + loc[r]] = v;
    /* the repeat rate and the gap read only this visit's counts, which stay as they
       are until the layer's next visit: cy_inputs computes them for the keys it needs */
    if (w[6] != 0.0) {
        double *restrict inv = sh->linv + (size_t)ll * k;
        const double prior = sh->prior;
        for (int r = 0; r < k; r++) inv[r] = 1.0 / (rcount[b0 + loc[r]] + prior);
    }
    memset(sh->pok + b0, 0, (size_t)E);
    uint64_t sm = 0;
    for (int r = 0; r < k; r++) sm |= (uint64_t)1 << (loc[r] & 63);
    sh->stepmask = sm;
    sh->cur = sh->layer0 + ll;
}
/* The repeat rate of local key x (expert e of local layer ll, first key b0): the mean over
   the latest visit's experts a of (rep[a][e] + prior k / E) / (rcount[a] + prior), summed
   in rank order as the Python class does. */
MER_INLINE double cy_repeat(const CycleShared *sh, int32_t ll, int32_t b0, int32_t e) {
    const int n = sh->n_latest[ll];
    const int32_t *lat = sh->latest + (size_t)ll * sh->k;
    const double *inv = sh->linv + (size_t)ll * sh->k;
    const double *rep = sh->rep + (size_t)b0 * sh->E + e;
    const double pk = sh->pk;
    const int32_t E = sh->E;
    double rp = 0.0;
    if (n == 2) /* the common k = 2, unrolled */
        return ((rp + (rep[(size_t)lat[0] * E] + pk) * inv[0]) +
                (rep[(size_t)lat[1] * E] + pk) * inv[1]) * sh->inv_k;
    for (int r = 0; r < n; r++) rp += (rep[(size_t)lat[r] * E] + pk) * inv[r];
    /* x / n == x * (1 / n) exactly when n is a power of two (both round the
       same real number): the common k = 2 needs no division */
    if ((n & (n - 1)) == 0) return rp * (n == sh->k ? sh->inv_k : 1.0 / (double)n);
    return rp / (double)n;
}
/* The inputs of z of local key x at its layer's latest visit (they stay as they are until
   the layer's next visit): the gap, `used` and the repeat rate. */
typedef struct {
    double rp, used;
    int64_t gap;
} CyIn;
MER_INLINE CyIn cy_inputs(const CycleShared *sh, int32_t x) {
    const int32_t ll = sh->kl[x], b0 = ll * sh->E;
    const int64_t last = sh->last[x], v = sh->visits[ll];
    CyIn in;
    int64_t gap = last >= 0 ? v - last : CY_GAP_CAP;
    if (gap > CY_GAP_CAP) gap = CY_GAP_CAP;
    in.gap = gap;
    in.used = (double)(gap == 0);
    in.rp = sh->w[6] != 0.0 ? cy_repeat(sh, ll, b0, x - b0) : 0.0;
    return in;
}
/* z of x exactly: the Python class's expression on libm's logarithms. */
static double cy_exact(CycleShared *sh, int32_t x) {
    if (sh->pok[x] != 2) {
        const CyIn in = cy_inputs(sh, x);
        const double z = cy_prob(sh, sh->el[x], sh->em[x], sh->es[x], in.used, in.gap, in.rp);
        sh->zlo[x] = sh->zhi[x] = z;
        sh->pok[x] = 2;
    }
    return sh->zlo[x];
}
/* Bounds of libm's log(y), y in bucket j of [2^-7, 2) (the octave of y, then the top
   CY_LOGT_BITS bits of its mantissa: y = 2^e m, m in [1 + i/N, 1 + (i+1)/N), N = 2^bits):
   the logarithms of the bucket's ends, e ln 2 + log(m_end), widened by CY_LOG_MARGIN,
   which covers libm's error and every rounding here many times over (they are below
   1e-15 for these y). Other y (never reached: y is an average in [0, 1] or a rate in
   [0, 1], plus CY_EPS) get libm's value itself. */
MER_INLINE void cy_logb(const double *restrict logt, double y, double *lo, double *hi) {
    uint64_t b;
    memcpy(&b, &y, sizeof b);
    /* sign, biased exponent and the top mantissa bits, from the first bucket */
    const uint64_t j = (b >> (52 - CY_LOGT_BITS)) - ((uint64_t)(1023 + CY_LOGT_E0) << CY_LOGT_BITS);
    if (__builtin_expect(j >= CY_LOGT_N, 0)) {
        *lo = *hi = log(y);
        return;
    }
    *lo = logt[j];
    *hi = logt[j + 1] + 2.0 * CY_LOG_MARGIN;
}
/* z += w * log(y) for log(y) in [a, b]: rounding is monotone, so the same expression on
   the ends bounds the exact one (ends swapped for w < 0). */
MER_INLINE void cy_term(double w, double a, double b, double *lo, double *hi) {
    if (w > 0.0) {
        *lo += w * a;
        *hi += w * b;
    } else {
        *lo += w * b;
        *hi += w * a;
    }
}
/* Bounds of z of x (cy_prob's terms in its order; the exact terms added to both ends). */
static void cy_bound_any(CycleShared *sh, int32_t x) {
    if (sh->exact_only) {
        cy_exact(sh, x);
        return;
    }
    const CyIn in = cy_inputs(sh, x);
    const double *w = sh->w;
    double lo = w[0], hi = w[0], a, b;
    if (w[1] != 0.0) {
        cy_logb(sh->logt, sh->el[x] + CY_EPS, &a, &b);
        cy_term(w[1], a, b, &lo, &hi);
    }
    if (w[2] != 0.0) {
        cy_logb(sh->logt, sh->em[x] + CY_EPS, &a, &b);
        cy_term(w[2], a, b, &lo, &hi);
    }
    if (w[3] != 0.0) {
        cy_logb(sh->logt, sh->es[x] + CY_EPS, &a, &b);
        cy_term(w[3], a, b, &lo, &hi);
    }
    if (w[4] != 0.0) {
        const double t = w[4] * in.used;
        lo += t;
        hi += t;
    }
    if (w[5] != 0.0) {
        const double t = w[5] * sh->l1p[in.gap]; /* libm's log1p(gap), from the table */
        lo += t;
        hi += t;
    }
    if (w[6] != 0.0) {
        cy_logb(sh->logt, in.rp + CY_EPS, &a, &b);
        cy_term(w[6], a, b, &lo, &hi);
    }
    sh->zlo[x] = lo;
    sh->zhi[x] = hi;
    sh->pok[x] = 1;
}
/* The same for the default terms (bias, ema_mid, used_last, repeat: `lean`, weights of
   ema_mid and repeat > 0), without a test per term. */
MER_INLINE void cy_bound(CycleShared *sh, int32_t x) {
    if (sh->pok[x]) return;
    if (!sh->lean) {
        cy_bound_any(sh, x);
        return;
    }
    const int32_t ll = sh->kl[x], b0 = ll * sh->E;
    const double *w = sh->w;
    double lo = w[0], hi = w[0], a, b;
    cy_logb(sh->logt, sh->em[x] + CY_EPS, &a, &b);
    lo += w[2] * a;
    hi += w[2] * b;
    const double t = w[4] * (double)(sh->last[x] == sh->visits[ll]); /* used: gap 0 */
    lo += t;
    hi += t;
    cy_logb(sh->logt, cy_repeat(sh, ll, b0, x - b0) + CY_EPS, &a, &b);
    lo += w[6] * a;
    hi += w[6] * b;
    sh->zlo[x] = lo;
    sh->zhi[x] = hi;
    sh->pok[x] = 1;
}
MER_INLINE void cycle_features(CycleShared *sh, const int32_t *keys, int k) {
    if (!sh->started) cycle_start(sh, k);
    if (sh->E == 8)
        cy_features_e(sh, keys, k, 8);
    else
        cy_features_e(sh, keys, k, sh->E);
}
/* The lowest z among a layer's keys (key order; ties: the smaller key), and bounds of
   it. By bounds: c = the first lowest lower bound; if every other key's lower bound (the
   second lowest, m2) is above c's upper bound, c is the unique lowest exactly. Else
   every key whose lower bound reaches c's upper bound gets its exact z, and the lowest
   of those, first in key order, is the answer: the others are above c's exact z, so
   neither lower nor tied. Keys come from a mask of the layer's experts (E <= 64: `m`,
   first key b0) or a list (`xs`, n of them). */
typedef struct {
    int32_t c;
    double m1, m2;
} CyPick;
MER_INLINE void cy_pick_add(CycleShared *sh, CyPick *p, int32_t x) {
    cy_bound(sh, x);
    const double v = sh->zlo[x];
    const double hi = v < p->m1 ? p->m1 : v;
    p->m2 = hi < p->m2 ? hi : p->m2;
    if (p->c < 0 || v < p->m1) {
        p->c = x;
        p->m1 = v;
    }
}
MER_INLINE void cy_refine_add(CycleShared *sh, double hc, int32_t x, int32_t *best,
                              double *bz) {
    if (!(sh->zlo[x] <= hc)) return;
    const double z = cy_exact(sh, x);
    if (*best < 0 || z < *bz) {
        *best = x;
        *bz = z;
    }
}
static int32_t cy_pick_exact(CycleShared *sh, uint64_t m, int32_t b0, const int32_t *xs,
                             int n, double *lo, double *hi) {
    int32_t cand = -1;
    double cp = INFINITY;
    for (int j = 0; xs ? j < n : m != 0; j++) {
        int32_t x;
        if (xs) {
            x = xs[j];
        } else {
            x = b0 + __builtin_ctzll(m);
            m &= m - 1;
        }
        const double z = cy_exact(sh, x);
        if (cand < 0 || z < cp) {
            cand = x;
            cp = z;
        }
    }
    *lo = *hi = cp;
    return cand;
}
/* the keys whose lower bound reaches hc, exactly */
static int32_t cy_pick_refine(CycleShared *sh, uint64_t m, int32_t b0, const int32_t *xs,
                              int n, double hc, double *lo, double *hi) {
    int32_t best = -1;
    double bz = 0.0;
    if (xs) {
        for (int j = 0; j < n; j++) cy_refine_add(sh, hc, xs[j], &best, &bz);
    } else {
        for (; m; m &= m - 1) cy_refine_add(sh, hc, b0 + __builtin_ctzll(m), &best, &bz);
    }
    *lo = *hi = bz;
    return best;
}
/* A layer's victim candidate: the resident unprotected key with the lowest log-odds z
   (ties: the smaller key). Outside the current layer only pins are protected (the step's
   keys are all in its layer); in the current layer the step's keys are too. `prot` NULL:
   the shadow, whose only protected keys are the step's. Residents are a layer's bits
   (E <= 64) or its bytes. */
MER_INLINE int32_t cy_layer_cand(CycleShared *sh, const CySet *set, int32_t ll,
                                 const mer_prot *prot, const int32_t *step, int k,
                                 int is_cur, double *lo, double *hi) {
    const int32_t b0 = ll * sh->E;
    CyPick p = {-1, INFINITY, INFINITY};
    uint64_t m = 0;
    int32_t *xs = NULL;
    int n = 0;
    if (sh->bits) {
        m = set->rmask[ll];
        if (prot) m &= ~sh->pinmask[ll];
        if (is_cur) m &= ~sh->stepmask;
        if (sh->exact_only) return cy_pick_exact(sh, m, b0, NULL, 0, lo, hi);
        for (uint64_t mm = m; mm; mm &= mm - 1) cy_pick_add(sh, &p, b0 + __builtin_ctzll(mm));
    } else {
        xs = sh->xs;
        for (int32_t x = b0; x < b0 + sh->E; x++) {
            if (!set->res[x]) continue;
            if (prot) {
                if (is_prot(prot, x)) continue;
            } else if (is_cur) {
                int in = 0;
                for (int r = 0; r < k; r++) in |= step[r] == x;
                if (in) continue;
            }
            xs[n++] = x;
        }
        if (sh->exact_only) return cy_pick_exact(sh, 0, b0, xs, n, lo, hi);
        for (int j = 0; j < n; j++) cy_pick_add(sh, &p, xs[j]);
    }
    if (p.c < 0) {
        *lo = *hi = INFINITY;
        return -1;
    }
    const double hc = sh->zhi[p.c];
    if (hc < p.m2) { /* settled by the bounds */
        *lo = p.m1;
        *hi = hc;
        return p.c;
    }
    return cy_pick_refine(sh, m, b0, xs, n, hc, lo, hi);
}
/* The exact z of layer ll's candidate, kept in the set's bounds. */
static inline double cy_cand_exact(CycleShared *sh, CySet *set, int32_t ll) {
    if (set->cand[ll] >= 0 && !(set->clo[ll] == set->chi[ll]))
        set->clo[ll] = set->chi[ll] = cy_exact(sh, set->cand[ll]);
    return set->clo[ll];
}
/* The rule as written (a division per layer, exact values): for layers outside 0..L-1
   and weights beyond CY_WMAX (neither reaches here through mer: geometry comes from the
   trace, fitted weights are small). */
static int32_t cycle_best_literal(CycleShared *sh, CySet *set) {
    const int32_t L = sh->L;
    int32_t best = -1;
    double best_v = 0.0;
    for (int32_t ll = 0; ll < sh->nl; ll++) {
        if (set->cand[ll] < 0) continue;
        int32_t d = (sh->layer0 + ll - sh->cur) % L;
        if (d <= 0) d += L;
        double val = cy_cand_exact(sh, set, ll) - sh->invd[d];
        if (best < 0 || val < best_v) {
            best = set->cand[ll];
            best_v = val;
        }
    }
    return best;
}
/* The victim rule: per layer the candidate (cy_layer_cand), then across layers the lowest
   z - log d (ties: the lower layer). Pins never change, and only the current layer holds
   protected step keys, so every layer's candidate (and bounds of its z) is cached until
   the layer is visited, one of its keys leaves, or (the current layer) its step ends
   (`dirty`). A key entering needs none: the hit-only driver inserts only the step's keys,
   which the current layer's candidate leaves out until the step ends. Across layers, as
   within one: the lowest lower bound of z - log d (the same rounded subtraction on the
   bounds bounds it), and exact values only for the layers whose lower bound reaches its
   upper bound. */
/* Most victims come from the layers visited last (their d is the largest), so the layers
   are first read in decreasing d, from the current layer back, global scope: no layer not
   yet read has a lower bound of z - log d below G - log d (G: the lowest candidate bound
   of any layer, log d: that of the next layer to read, larger than any later one's), so
   the reading stops once that exceeds the upper bound of the best so far. The best is
   settled if its upper bound is also below every other read layer's lower bound: it is
   then the unique lowest, exactly. Else -1: the full search decides. */
static inline int32_t cy_best_recent(const CySet *set, const double *restrict ld, int32_t nl,
                                     int32_t cur) {
    const double *restrict clo = set->clo, *restrict chi = set->chi;
    double g = INFINITY;
    int32_t ll = 0;
#ifdef __SSE2__
    __m128d ga = _mm_set1_pd(INFINITY), gb = ga;
    for (; ll + 3 < nl; ll += 4) {
        ga = _mm_min_pd(ga, _mm_loadu_pd(clo + ll));
        gb = _mm_min_pd(gb, _mm_loadu_pd(clo + ll + 2));
    }
    ga = _mm_min_pd(ga, gb);
    g = _mm_cvtsd_f64(_mm_min_pd(ga, _mm_unpackhi_pd(ga, ga)));
#endif
    for (; ll < nl; ll++) g = clo[ll] < g ? clo[ll] : g;
    int32_t b = -1;
    double vb = INFINITY, hb = INFINITY, m2 = INFINITY;
    for (int32_t j = 0, q = cur; j < nl; j++, q = q ? q - 1 : nl - 1) {
        if (g - ld[q] > hb) break;
        const double v = clo[q] - ld[q];
        if (v < vb) {
            m2 = vb;
            b = q;
            vb = v;
            hb = chi[q] - ld[q];
        } else {
            m2 = v < m2 ? v : m2;
        }
    }
    return b >= 0 && hb < m2 ? set->cand[b] : -1;
}
static int32_t cycle_best(CycleShared *sh, CySet *set, const mer_prot *prot,
                          const int32_t *step, int k) {
    const int32_t L = sh->L, nl = sh->nl, cur = sh->cur - sh->layer0;
    int32_t *restrict cand = set->cand;
    double *restrict clo = set->clo, *restrict chi = set->chi;
    uint64_t *restrict dirty = set->dirty;
    for (int32_t w = 0; w < (nl + 63) / 64; w++) {
        uint64_t m = dirty[w];
        dirty[w] = 0;
        for (; m; m &= m - 1) {
            int32_t ll = w * 64 + __builtin_ctzll(m);
            cand[ll] = cy_layer_cand(sh, set, ll, prot, step, k, ll == cur, &clo[ll], &chi[ll]);
        }
    }
    const int32_t off = L + sh->layer0 - sh->cur;
    if (sh->exact_only || off < 1 || off + nl - 1 > 3 * L) return cycle_best_literal(sh, set);
    const double *restrict ld = sh->rot + off;
    if (nl == L && sh->layer0 == 0 && nl > 1) {
        const int32_t v = cy_best_recent(set, ld, nl, cur);
        if (v >= 0) return v;
    }
    double *restrict vlo = sh->vlo;
    /* the lowest and the second lowest lower bound (a tie makes them equal) */
    double m1 = INFINITY, m2 = INFINITY;
    int32_t ll = 0;
#ifdef __SSE2__
    /* two layers a lane pair (no NaN here: bounds are finite or +inf) */
    __m128d a1 = _mm_set1_pd(INFINITY), a2 = a1, b1 = a1, b2 = a1;
    for (; ll + 3 < nl; ll += 4) {
        const __m128d va = _mm_sub_pd(_mm_loadu_pd(clo + ll), _mm_loadu_pd(ld + ll));
        const __m128d vb = _mm_sub_pd(_mm_loadu_pd(clo + ll + 2), _mm_loadu_pd(ld + ll + 2));
        _mm_storeu_pd(vlo + ll, va);
        _mm_storeu_pd(vlo + ll + 2, vb);
        a2 = _mm_min_pd(a2, _mm_max_pd(a1, va));
        a1 = _mm_min_pd(a1, va);
        b2 = _mm_min_pd(b2, _mm_max_pd(b1, vb));
        b1 = _mm_min_pd(b1, vb);
    }
    /* merge the four lanes' (lowest, second lowest) pairs */
    double l1[4], l2[4];
    _mm_storeu_pd(l1, a1);
    _mm_storeu_pd(l1 + 2, b1);
    _mm_storeu_pd(l2, a2);
    _mm_storeu_pd(l2 + 2, b2);
    for (int j = 0; j < 4; j++) {
        const double hi = l1[j] < m1 ? m1 : l1[j];
        m2 = l2[j] < m2 ? l2[j] : m2;
        m2 = hi < m2 ? hi : m2;
        m1 = l1[j] < m1 ? l1[j] : m1;
    }
#endif
    for (; ll < nl; ll++) {
        const double v = clo[ll] - ld[ll];
        vlo[ll] = v;
        const double hi = v < m1 ? m1 : v;
        m2 = hi < m2 ? hi : m2;
        m1 = v < m1 ? v : m1;
    }
    int32_t b = 0; /* the first layer whose lower bound is m1 */
    int found = 0;
#ifdef __SSE2__
    const __m128d mm = _mm_set1_pd(m1);
    for (; b + 3 < nl; b += 4) {
        const int hit = _mm_movemask_pd(_mm_cmpeq_pd(_mm_loadu_pd(vlo + b), mm)) |
                        _mm_movemask_pd(_mm_cmpeq_pd(_mm_loadu_pd(vlo + b + 2), mm)) << 2;
        if (hit) {
            b += __builtin_ctz((unsigned)hit);
            found = 1;
            break;
        }
    }
#endif
    if (!found)
        while (vlo[b] != m1) b++; /* m1 is one of them */
    const double vh = chi[b] - ld[b];
    if (vh < m2) return cand[b]; /* every other layer's lower bound is above b's upper */
    int32_t best = -1;
    double bv = 0.0;
    for (ll = 0; ll < nl; ll++) {
        if (!(vlo[ll] <= vh) || cand[ll] < 0) continue;
        const double v = cy_cand_exact(sh, set, ll) - ld[ll];
        if (best < 0 || v < bv) {
            best = cand[ll];
            bv = v;
        }
    }
    return best;
}
static inline void cy_dirty(CySet *set, int32_t ll) {
    set->dirty[ll >> 6] |= (uint64_t)1 << (ll & 63);
}
/* A key enters (no dirty: see cycle_best) or leaves the set. */
static inline void cy_set_key(CySet *set, const CycleShared *sh, int32_t x, uint8_t on) {
    const int32_t ll = sh->kl[x];
    set->res[x] = on;
    if (sh->bits) {
        const uint64_t bit = (uint64_t)1 << (x - ll * sh->E);
        set->rmask[ll] = on ? set->rmask[ll] | bit : set->rmask[ll] & ~bit;
    }
    if (!on) cy_dirty(set, ll);
}
static void cycle_init(void *sv, const mer_ctx *c) {
    Cycle *s = sv;
    Cycle_lay(s, c);
    memset(s->real.res, 0, c->n_keys);
    memset(s->shadow.res, 0, c->n_keys);
    memset(s->real.rmask, 0, sizeof(uint64_t) * c->n_keys);
    memset(s->shadow.rmask, 0, sizeof(uint64_t) * c->n_keys);
    memset(s->real.dirty, 0, sizeof(uint64_t) * CY_WORDS(c));
    memset(s->shadow.dirty, 0, sizeof(uint64_t) * CY_WORDS(c));
    for (int32_t ll = 0; ll < cy_nl(c); ll++) { /* every layer */
        cy_dirty(&s->real, ll);
        cy_dirty(&s->shadow, ll);
    }
    memset(s->lin, 0, c->n_keys);
    for (int32_t i = 0; i < c->n_keys; i++) s->prv[i] = s->nxt[i] = s->sprv[i] = s->snxt[i] = -1;
    s->S = c->n_keys;
    l_init(s->prv, s->nxt, s->S);
    l_init(s->sprv, s->snxt, s->S);
    s->cap = c->cap;
    s->n_sres = s->n_lin = 0;
    s->duel = c->p[CY_NW + 4] != 0.0;
    s->decay = c->p[CY_NW + 5];
    s->hl = s->hc = 0.0;
    s->lru_mode = 0;
    s->sh = c->shared;
    if (!s->sh->ready) cycle_shared_init(s->sh, c);
}
static void cycle_duel(Cycle *s, const int32_t *keys, int k) {
    int hits_l = 0, hits_c = 0;
    for (int r = 0; r < k; r++)
        if (s->lin[keys[r]]) hits_l++;
    for (int r = 0; r < k; r++) {
        int32_t x = keys[r];
        if (s->lin[x]) continue;
        if (s->n_lin >= s->cap) {
            int32_t v = -1;
            for (int32_t y = s->snxt[s->S]; y != s->S; y = s->snxt[y]) {
                int in = 0;
                for (int r2 = 0; r2 < k; r2++)
                    if (keys[r2] == y) in = 1;
                if (!in) {
                    v = y;
                    break;
                }
            }
            if (v < 0) continue;
            l_unlink(s->sprv, s->snxt, v);
            s->lin[v] = 0;
            s->n_lin--;
        }
        l_push(s->sprv, s->snxt, s->S, x);
        s->lin[x] = 1;
        s->n_lin++;
    }
    for (int r = k - 1; r >= 0; r--) {
        int32_t x = keys[r];
        if (s->lin[x]) {
            l_unlink(s->sprv, s->snxt, x);
            l_push(s->sprv, s->snxt, s->S, x);
        }
    }
    uint8_t *sres = s->shadow.res;
    for (int r = 0; r < k; r++)
        if (sres[keys[r]]) hits_c++;
    for (int r = 0; r < k; r++) {
        int32_t x = keys[r];
        if (sres[x]) continue;
        if (s->n_sres >= s->cap) {
            int32_t v = cycle_best(s->sh, &s->shadow, NULL, keys, k);
            if (v < 0) continue;
            cy_set_key(&s->shadow, s->sh, v, 0);
            s->n_sres--;
        }
        cy_set_key(&s->shadow, s->sh, x, 1);
        s->n_sres++;
    }
    cy_dirty(&s->shadow, s->sh->kl[keys[0]]); /* its step keys are no longer protected */
    s->hl = s->decay * s->hl + (double)hits_l;
    s->hc = s->decay * s->hc + (double)hits_c;
    s->lru_mode = s->hl > s->hc;
}
MER_INLINE void cycle_begin(void *sv, int64_t t, const int32_t *keys, const int64_t *nu,
                            int k) {
    Cycle *s = sv;
    CycleShared *sh = s->sh;
    (void)nu;
    if (sh->last_t != t) { /* the first cache of the pass to see step t */
        sh->last_t = t;
        cycle_features(sh, keys, k);
    }
    int32_t ll = sh->kl[keys[0]]; /* its keys' z just changed */
    cy_dirty(&s->real, ll);
    if (s->duel) {
        cy_dirty(&s->shadow, ll);
        cycle_duel(s, keys, k);
    }
}
MER_INLINE void cycle_end(void *sv, int64_t t, const int32_t *keys, int k) {
    Cycle *s = sv;
    (void)t;
    cy_dirty(&s->real, s->sh->kl[keys[0]]); /* its step keys are no longer protected */
    if (!s->duel) return; /* the LRU order is read only in the duel's LRU mode */
    for (int r = k - 1; r >= 0; r--) {
        int32_t x = keys[r];
        if (s->prv[x] >= 0) {
            l_unlink(s->prv, s->nxt, x);
            l_push(s->prv, s->nxt, s->S, x);
        }
    }
}
MER_INLINE void cycle_insert(void *sv, int32_t x) {
    Cycle *s = sv;
    cy_set_key(&s->real, s->sh, x, 1);
    if (s->duel) l_push(s->prv, s->nxt, s->S, x);
}
static void cycle_remove(void *sv, int32_t x) {
    Cycle *s = sv;
    cy_set_key(&s->real, s->sh, x, 0);
    if (s->duel) l_unlink(s->prv, s->nxt, x);
}
static int32_t cycle_evict(void *sv, const mer_prot *p) {
    Cycle *s = sv;
    int32_t v = -1;
    if (s->lru_mode) {
        for (int32_t x = s->nxt[s->S]; x != s->S; x = s->nxt[x])
            if (!is_prot(p, x)) {
                v = x;
                break;
            }
    } else {
        v = cycle_best(s->sh, &s->real, p, NULL, 0);
    }
    if (v >= 0) cycle_remove(s, v);
    return v;
}

static const mer_policy CYCLE_POLICY = {
    "cycle",
    "w0 w1 w2 w3 w4 w5 w6 rate_long rate_mid rate_short prior duel duel_decay n_layers n_experts",
    1, 0, Cycle_size, cycle_shared_size, cycle_init, cycle_begin, NULL, NULL, cycle_evict,
    cycle_remove, cycle_insert, cycle_end,
};


/* == cotoken: cycle's hit density with the whole token as evidence (mer/core/cotoken.py) == */
/* Every feature depends on the trace only, so one shared block serves every cache of
   a pass (as cycle's); each cache keeps only its residents. The score of a key is
   computed when a victim search first needs it in a step (z - log d, the Python
   class's `F @ w - log d`), and the naive-Bayes evidence of a key (the `cooccur`
   model's `_ev_next`: one block of likelihood ratios per observed layer of this
   token) is brought up to date only then, adding the blocks in the order Python adds
   them. The likelihood ratios come from the pair counts through tables of log(m +
   alpha) and log(m + 2 alpha) (log q1 - log q0 = log(P + a) - log(Nn + 2a) - ...),
   which is the Python expression in exact arithmetic; numpy's own vectorised
   logarithms and BLAS sums are not libm's, so the two agree to rounding, and the
   property tests hold their decisions equal (tests/test_replay_native.py). */

#define CT_NW 9
#define CT_EPS 0.01

typedef struct {
    int32_t n_keys, E, L, nl, layer0, k;
    int nb; /* naive Bayes: a global view of two layers or more */
    double w[CT_NW], rm, prior, alpha;
    /* cycle's terms per key, at its layer's latest visit */
    double *ema, *t1, *t2, *t3, *zs, *zn; /* zs, zn: the terms times w0..3, w4..7 */
    double *rq;   /* the repeat rate over k of the latest visit: t3 = log(rq + eps) */
    uint8_t *zok; /* t1, t3, zs, zn are current (computed when first needed after a visit) */
    struct ct_pend *pend; /* an eviction's keys whose score is only bounded so far */
    double *slog_tab;      /* log1p of the bound grid (see ct_lower) */
    double *rep, *rcount, *r;             /* transition counts; r: a visit's repeat rates */
    int32_t *latest, *n_latest, *loc;
    double *logd;                          /* log d, d = 0..L */
    int32_t *kl;                           /* local layer of every key */
    double *ldl;     /* per local layer, this step: log d of its next visit */
    uint8_t *later;  /* per local layer, this step: still to come in this token */
    /* the per-step score cache */
    double *score;
    uint32_t *score_at, stamp;
    int64_t last_t;
    int32_t cur; /* global layer of the current step (-1 before the first) */
    int started, ready;
    /* naive Bayes (nb): counts, this and the previous token, tables, this token's blocks */
    int32_t *P, *n, *n_prev, *n_next;
    int64_t T, Tp;
    uint8_t *curtok, *prevtok;
    int32_t *prev_on, n_prev_on, *cur_on, n_cur_on;
    int has_prev, nb_layer;
    double *LA, *LB; /* log(m + alpha), log(m + 2 alpha) for m < tab_n */
    int64_t tab_n;
    int32_t *ev_layer, n_ev, ev_cap; /* this token's observed blocks: layer, and xs */
    int32_t *ev_e, *ev_np; /* per block: its experts picked first, then the others (each
                              in expert order), and how many were picked */
    double *acc; /* _ev_next of every key, after its first acc_n[x] blocks */
    int32_t *acc_n;
    double *lp; /* logit prior (once per token: lp_at) */
    int64_t *lp_at, tok;
    int oom;
    /* many caches side by side (`mer mrc`): every key's score, sorted once per step,
       and each cache takes the first of its residents in that order */
    int sorted;
    struct ct_rank *order;
    uint32_t order_at;
    void *ext; /* a policy built on this block (knn): its own state, or NULL */
} CotokenShared;

struct ct_rank {
    double s;
    int32_t x;
};
struct ct_pend {
    double lb;
    int32_t x;
};
/* Passes of at least this many caches rank every key once per step (same victims). */
#define CT_SORT_MIN 4

typedef struct {
    int32_t *list, *pos; /* residents, unordered, and each one's index in list (-1: out) */
    int32_t n;
    CotokenShared *sh;
} Cotoken;

/* params: w0..w8 rate_mid prior alpha n_layers n_experts */
static int32_t ct_E(const mer_ctx *c) { return geo_param(c, CT_NW + 4); }
static int32_t ct_nl(const mer_ctx *c) { return geo_layers_held(c, ct_E(c)); }
static int32_t ct_L(const mer_ctx *c) {
    const int32_t L = geo_param(c, CT_NW + 3), nl = ct_nl(c);
    return L > nl ? L : nl;
}
static int ct_has_nb(const mer_ctx *c) { return ct_L(c) > 1 && c->n_keys > ct_E(c); }

#define COTOKEN_ARRAYS(s, a, c)                                   \
    do {                                                          \
        (s)->list = take((a), sizeof(int32_t) * (c)->n_keys);     \
        (s)->pos = take((a), sizeof(int32_t) * (c)->n_keys);      \
    } while (0)
DEFINE_SIZE_INIT(Cotoken, COTOKEN_ARRAYS)

/* The grid of ct_lower's bounds: |v| in [2^CT_EMIN, 2^CT_EMAX), 2^CT_MB points an octave. */
#define CT_EMIN (-24)
#define CT_EMAX 24
#define CT_MB 5
#define CT_TAB ((((CT_EMAX) - (CT_EMIN)) << CT_MB) + 1)
#define CT_EV0 64 /* blocks kept per token before they are added to every key at once */
#define COTOKEN_SHARED_ARRAYS(sh, a, c)                                              \
    do {                                                                             \
        size_t nk_ = (size_t)(c)->n_keys, nl_ = (size_t)ct_nl(c);                    \
        size_t E_ = (size_t)ct_E(c), k_ = (size_t)(c)->k, L_ = (size_t)ct_L(c);      \
        size_t nb_ = (size_t)ct_has_nb(c);                                           \
        (sh)->ema = take((a), sizeof(double) * nk_);                                 \
        (sh)->t1 = take((a), sizeof(double) * nk_);                                  \
        (sh)->t2 = take((a), sizeof(double) * nk_);                                  \
        (sh)->t3 = take((a), sizeof(double) * nk_);                                  \
        (sh)->zs = take((a), sizeof(double) * nk_);                                  \
        (sh)->zn = take((a), sizeof(double) * nk_);                                  \
        (sh)->rq = take((a), sizeof(double) * nk_);                                  \
        (sh)->zok = take((a), nk_);                                                  \
        (sh)->pend = take((a), sizeof(struct ct_pend) * nk_);                        \
        (sh)->slog_tab = take((a), sizeof(double) * CT_TAB);                         \
        (sh)->rep = take((a), sizeof(double) * nl_ * E_ * E_);                       \
        (sh)->rcount = take((a), sizeof(double) * nk_);                              \
        (sh)->r = take((a), sizeof(double) * E_);                                    \
        (sh)->latest = take((a), sizeof(int32_t) * nl_ * k_);                        \
        (sh)->n_latest = take((a), sizeof(int32_t) * nl_);                           \
        (sh)->loc = take((a), sizeof(int32_t) * (k_ + 1));                           \
        (sh)->logd = take((a), sizeof(double) * (L_ + 1));                           \
        (sh)->kl = take((a), sizeof(int32_t) * nk_);                                 \
        (sh)->ldl = take((a), sizeof(double) * nl_);                                 \
        (sh)->later = take((a), nl_);                                                \
        (sh)->score = take((a), sizeof(double) * nk_);                               \
        (sh)->score_at = take((a), sizeof(uint32_t) * nk_);                          \
        (sh)->P = take((a), sizeof(int32_t) * nk_ * nk_ * nb_);                      \
        (sh)->n = take((a), sizeof(int32_t) * nk_);                                  \
        (sh)->n_prev = take((a), sizeof(int32_t) * nk_);                             \
        (sh)->n_next = take((a), sizeof(int32_t) * nk_);                             \
        (sh)->curtok = take((a), nk_);                                               \
        (sh)->prevtok = take((a), nk_);                                              \
        (sh)->prev_on = take((a), sizeof(int32_t) * nk_);                            \
        (sh)->cur_on = take((a), sizeof(int32_t) * nk_);                             \
        (sh)->ev_layer = take((a), sizeof(int32_t) * CT_EV0);                        \
        (sh)->ev_e = take((a), sizeof(int32_t) * E_ * CT_EV0);                       \
        (sh)->ev_np = take((a), sizeof(int32_t) * CT_EV0);                           \
        (sh)->acc = take((a), sizeof(double) * nk_);                                 \
        (sh)->acc_n = take((a), sizeof(int32_t) * nk_);                              \
        (sh)->lp = take((a), sizeof(double) * nk_);                                  \
        (sh)->lp_at = take((a), sizeof(int64_t) * nk_);                              \
        (sh)->order = take((a), sizeof(struct ct_rank) * nk_);                       \
    } while (0)
DEFINE_SIZE_INIT(CotokenShared, COTOKEN_SHARED_ARRAYS)

static size_t cotoken_shared_size(const mer_ctx *c) { return CotokenShared_size(c); }

static inline double ct_dot_same(const CotokenShared *sh, int32_t x) {
    const double *w = sh->w;
    return ((w[0] + w[1] * sh->t1[x]) + w[2] * sh->t2[x]) + w[3] * sh->t3[x];
}
static inline double ct_dot_next(const CotokenShared *sh, int32_t x) {
    const double *w = sh->w;
    return ((w[4] + w[5] * sh->t1[x]) + w[6] * sh->t2[x]) + w[7] * sh->t3[x];
}

static void cotoken_shared_init(CotokenShared *sh, const mer_ctx *c) {
    CotokenShared_lay(sh, c);
    int32_t nk = c->n_keys, E = ct_E(c), nl = ct_nl(c);
    for (int i = 0; i < CT_NW; i++) sh->w[i] = c->p[i];
    sh->rm = c->p[CT_NW];
    sh->prior = c->p[CT_NW + 1];
    sh->alpha = c->p[CT_NW + 2];
    sh->n_keys = nk;
    sh->E = E;
    sh->nl = nl;
    sh->L = ct_L(c);
    sh->layer0 = c->key_base / E;
    sh->k = c->k;
    sh->nb = ct_has_nb(c);
    sh->logd[0] = 0.0;
    for (int32_t d = 1; d <= sh->L; d++) sh->logd[d] = log((double)d);
    for (int32_t x = 0; x < nk; x++) sh->kl[x] = x / E < nl ? x / E : nl - 1;
    memset(sh->rep, 0, sizeof(double) * (size_t)nl * E * E);
    memset(sh->rcount, 0, sizeof(double) * nk);
    memset(sh->n_latest, 0, sizeof(int32_t) * nl);
    memset(sh->score_at, 0, sizeof(uint32_t) * nk);
    sh->stamp = 0;
    sh->last_t = INT64_MIN;
    sh->cur = -1;
    sh->started = 0;
    if (sh->nb) memset(sh->P, 0, sizeof(int32_t) * (size_t)nk * nk);
    memset(sh->n, 0, sizeof(int32_t) * nk);
    memset(sh->n_prev, 0, sizeof(int32_t) * nk);
    memset(sh->n_next, 0, sizeof(int32_t) * nk);
    memset(sh->curtok, 0, nk);
    memset(sh->prevtok, 0, nk);
    sh->n_prev_on = sh->n_cur_on = 0;
    sh->T = sh->Tp = 0;
    sh->has_prev = 0;
    sh->nb_layer = -1;
    sh->LA = sh->LB = NULL;
    sh->tab_n = 0;
    sh->n_ev = 0;
    sh->ev_cap = CT_EV0;
    memset(sh->acc, 0, sizeof(double) * nk);
    memset(sh->acc_n, 0, sizeof(int32_t) * nk);
    for (int32_t i = 0; i < nk; i++) sh->lp_at[i] = -1;
    sh->tok = 0;
    sh->oom = 0;
    sh->sorted = c->n_caches >= CT_SORT_MIN;
    for (int i = 0; i < CT_TAB; i++) { /* log1p at the grid points 2^e (1 + j / 2^CT_MB) */
        const uint64_t bits = ((uint64_t)(1023 + CT_EMIN) << CT_MB) + (uint64_t)i;
        double g;
        const uint64_t gb = bits << (52 - CT_MB);
        memcpy(&g, &gb, sizeof g);
        sh->slog_tab[i] = log1p(g);
    }
    sh->order_at = 0;
    sh->ready = 1;
}
/* Tables of log(m + alpha) and log(m + 2 alpha) for every count m <= the tokens seen. */
static void ct_tables(CotokenShared *sh, int64_t need) {
    if (need <= sh->tab_n) return;
    int64_t n = sh->tab_n ? sh->tab_n : 64;
    while (n < need) n *= 2;
    double *la = realloc(sh->LA, sizeof(double) * n), *lb;
    if (!la) {
        sh->oom = 1;
        return;
    }
    sh->LA = la;
    lb = realloc(sh->LB, sizeof(double) * n);
    if (!lb) {
        sh->oom = 1;
        return;
    }
    sh->LB = lb;
    const double a = sh->alpha;
    for (int64_t m = sh->tab_n; m < n; m++) {
        sh->LA[m] = log((double)m + a);
        sh->LB[m] = log((double)m + 2 * a);
    }
    sh->tab_n = n;
}
/* The first step: every expert at the uninformed rate k / E (Python `_start`). */
static void ct_start(CotokenShared *sh) {
    const double base = (double)sh->k / (double)sh->E;
    const double lb = log(base + CT_EPS);
    for (int32_t x = 0; x < sh->n_keys; x++) {
        sh->ema[x] = base;
        sh->t1[x] = lb;
        sh->t2[x] = 0.0;
        sh->t3[x] = lb;
        sh->zs[x] = ct_dot_same(sh, x);
        sh->zn[x] = ct_dot_next(sh, x);
        sh->zok[x] = 1;
    }
    if (sh->nb) ct_tables(sh, 2);
    sh->started = 1;
}
/* One visit of a layer: cycle's recurrences (Python `_visit`, same expressions). */
static void ct_visit(CotokenShared *sh, const int32_t *keys, int k) {
    const int32_t E = sh->E;
    int32_t ll = keys[0] / E;
    if (ll >= sh->nl) ll = sh->nl - 1;
    const int32_t b0 = ll * E;
    int32_t *lat = sh->latest + (size_t)ll * sh->k, *loc = sh->loc;
    for (int r = 0; r < k; r++) loc[r] = keys[r] - b0;
    for (int i = 0; i < sh->n_latest[ll]; i++) {
        int32_t a = lat[i];
        sh->rcount[b0 + a] += 1.0;
        double *row = sh->rep + ((size_t)b0 + a) * E;
        for (int r = 0; r < k; r++) row[loc[r]] += 1.0;
    }
    for (int r = 0; r < k; r++) lat[r] = loc[r];
    sh->n_latest[ll] = k;
    const double rm = sh->rm, pk = sh->prior * ((double)sh->k / (double)E);
    double *t2 = sh->t2 + b0;
    for (int32_t e = 0; e < E; e++) t2[e] = 0.0;
    for (int r = 0; r < k; r++) t2[loc[r]] = 1.0;
    double *ema = sh->ema + b0, *r_ = sh->r;
    for (int32_t e = 0; e < E; e++) {
        ema[e] = (1.0 - rm) * ema[e] + rm * t2[e];
        r_[e] = 0.0;
    }
    /* the mean over the visit's experts a of (rep[a][e] + pk) / (rcount[a] + prior),
       summed in rank order, then divided by their number (numpy's mean) */
    for (int r = 0; r < k; r++) {
        const double den = sh->rcount[b0 + loc[r]] + sh->prior;
        const double *row = sh->rep + ((size_t)b0 + loc[r]) * E;
        for (int32_t e = 0; e < E; e++) r_[e] += (row[e] + pk) / den;
    }
    /* the logarithms wait until a score needs them (ct_terms): most keys are not resident */
    for (int32_t e = 0; e < E; e++) {
        sh->rq[b0 + e] = r_[e] / (double)k;
        sh->zok[b0 + e] = 0;
    }
}
/* t1, t3, zs and zn of key x at its layer's latest visit: its ema and rq are as that
   visit left them, so these are the values the visit would have computed. */
static inline void ct_terms(CotokenShared *sh, int32_t x) {
    if (sh->zok[x]) return;
    sh->t1[x] = log(sh->ema[x] + CT_EPS);
    sh->t3[x] = log(sh->rq[x] + CT_EPS);
    sh->zs[x] = ct_dot_same(sh, x);
    sh->zn[x] = ct_dot_next(sh, x);
    sh->zok[x] = 1;
}
/* One observed block's likelihood ratios, added to key y's evidence (Python
   `xs @ V1[block] + (1 - xs) @ V0[block]`, V from the counts). */
/* One observed block's likelihood ratios, added to key y's evidence (Python
   `xs @ V1[block] + (1 - xs) @ V0[block]`, V from the counts): the picked experts'
   terms summed in expert order, then the others', as a branch on xs[e] in expert order
   would sum them (the block lists its picked experts first: no branch to mispredict). */
MER_INLINE double ct_block_e(const CotokenShared *sh, int32_t layer, const int32_t *ev,
                             const int32_t np, int32_t y, const int32_t E) {
    const int32_t nk = sh->n_keys;
    const int64_t Tp = sh->Tp;
    const int32_t nn = sh->n_next[y];
    const double *LA = sh->LA, *LB = sh->LB;
    const double lb1 = LB[nn], lb0 = LB[Tp - nn];
    double s1 = 0.0, s0 = 0.0;
    const int32_t *P = sh->P + (size_t)y * nk + (size_t)layer * E; /* P[y][x]: a block's x together */
    const int32_t *np_ = sh->n_prev + (size_t)layer * E;
    int32_t j = 0;
    for (; j < np; j++) {
        const int32_t e = ev[j], p = P[e], q = np_[e];
        s1 += (LA[p] - lb1) - (LA[q - p] - lb0);
    }
    for (; j < E; j++) {
        const int32_t e = ev[j], p = P[e], q = np_[e];
        s0 += (LA[nn - p] - lb1) - (LA[Tp - nn - q + p] - lb0);
    }
    return s1 + s0;
}
/* ct_block_e unrolled for Mixtral's 8 experts and top-2 (same sums, same order) */
static inline double ct_block(const CotokenShared *sh, int32_t layer, const int32_t *ev,
                              int32_t np, int32_t y) {
    if (sh->E == 8 && np == 2) return ct_block_e(sh, layer, ev, 2, y, 8);
    return ct_block_e(sh, layer, ev, np, y, sh->E);
}
static inline void ct_catch_up(CotokenShared *sh, int32_t y) {
    for (int32_t i = sh->acc_n[y]; i < sh->n_ev; i++)
        sh->acc[y] += ct_block(sh, sh->ev_layer[i], sh->ev_e + (size_t)i * sh->E,
                               sh->ev_np[i], y);
    sh->acc_n[y] = sh->n_ev;
}
/* cooccur's `observe` for the parts cotoken reads: counts at a token's end, this
   token's indicator, and its layer's block of evidence for the next token. */
static void ct_observe(CotokenShared *sh, const int32_t *keys, int k, int32_t layer) {
    const int32_t nk = sh->n_keys, E = sh->E;
    if (layer == 0 && sh->nb_layer >= 0) { /* a new token: count the finished one */
        sh->n_cur_on = 0;
        for (int32_t x = 0; x < nk; x++)
            if (sh->curtok[x]) {
                sh->cur_on[sh->n_cur_on++] = x;
                sh->n[x]++;
            }
        sh->T++;
        if (sh->has_prev) {
            for (int j = 0; j < sh->n_cur_on; j++) {
                int32_t *row = sh->P + (size_t)sh->cur_on[j] * nk; /* stored P[y][x] */
                for (int i = 0; i < sh->n_prev_on; i++) row[sh->prev_on[i]]++;
            }
            for (int i = 0; i < sh->n_prev_on; i++) sh->n_prev[sh->prev_on[i]]++;
            for (int j = 0; j < sh->n_cur_on; j++) sh->n_next[sh->cur_on[j]]++;
            sh->Tp++;
        }
        ct_tables(sh, sh->T + 2);
        memcpy(sh->prevtok, sh->curtok, nk);
        memcpy(sh->prev_on, sh->cur_on, sizeof(int32_t) * sh->n_cur_on);
        sh->n_prev_on = sh->n_cur_on;
        sh->has_prev = 1;
        memset(sh->curtok, 0, nk);
        memset(sh->acc, 0, sizeof(double) * nk);
        memset(sh->acc_n, 0, sizeof(int32_t) * nk);
        sh->n_ev = 0;
        sh->tok++;
    }
    sh->nb_layer = layer;
    for (int r = 0; r < k; r++) sh->curtok[keys[r]] = 1;
    if (sh->n_ev == sh->ev_cap) { /* add the kept blocks to every key, in order */
        for (int32_t y = 0; y < nk; y++) ct_catch_up(sh, y);
        memset(sh->acc_n, 0, sizeof(int32_t) * nk);
        sh->n_ev = 0;
    }
    sh->ev_layer[sh->n_ev] = layer;
    {
        const uint8_t *xs = sh->curtok + (size_t)layer * E;
        int32_t *ev = sh->ev_e + (size_t)sh->n_ev * E, np = 0;
        for (int32_t e = 0; e < E; e++)
            if (xs[e]) ev[np++] = e;
        sh->ev_np[sh->n_ev] = np;
        for (int32_t e = 0; e < E; e++)
            if (!xs[e]) ev[np++] = e;
    }
    sh->n_ev++;
}
/* z - log d of local key x after this step's begin (Python `F @ w - log d`). */
static inline double ct_score(CotokenShared *sh, int32_t x) {
    if (sh->score_at[x] == sh->stamp) return sh->score[x];
    ct_terms(sh, x);
    const int32_t ll = sh->kl[x];
    double z;
    if (sh->later[ll]) {
        z = sh->zs[x];
    } else {
        z = sh->zn[x];
        if (sh->nb) {
            ct_catch_up(sh, x);
            if (sh->lp_at[x] != sh->tok) {
                sh->lp[x] = sh->LA[sh->n[x]] - sh->LA[sh->T - sh->n[x]];
                sh->lp_at[x] = sh->tok;
            }
            const double v = sh->lp[x] + sh->acc[x];
            const double s = v > 0 ? log1p(v) : v < 0 ? -log1p(-v) : 0.0;
            z = z + sh->w[8] * s;
        }
    }
    const double sc = z - sh->ldl[ll];
    sh->score[x] = sc;
    sh->score_at[x] = sh->stamp;
    return sc;
}
/* A lower bound of ct_score(x) without its log1p, or NAN where there is none to give
   (the caller then computes the score). For a key of a layer already visited this token
   (naive Bayes on, w8 > 0) the score is zn + w8 slog(v) - log d, increasing in slog(v),
   and slog is increasing: slog(v) >= slog(g) for the grid point g at or below v, whose
   log1p is tabulated. The table's values are moved down by 2^-40 of themselves, far more
   than log1p's rounding, so the bound holds for the computed score, not only the exact
   one: every later operation (a multiply by w8 > 0, an add, a subtract) rounds monotonically. */
static inline double ct_lower(CotokenShared *sh, int32_t x) {
    if (sh->score_at[x] == sh->stamp) return sh->score[x];
    if (!sh->nb || !(sh->w[8] > 0.0)) return NAN;
    const int32_t ll = sh->kl[x];
    if (sh->later[ll]) return NAN; /* z = zs: no log1p to save */
    ct_terms(sh, x);
    ct_catch_up(sh, x);
    if (sh->lp_at[x] != sh->tok) {
        sh->lp[x] = sh->LA[sh->n[x]] - sh->LA[sh->T - sh->n[x]];
        sh->lp_at[x] = sh->tok;
    }
    const double v = sh->lp[x] + sh->acc[x];
    const double a = fabs(v);
    double s;
    if (!(a < 0x1p24)) return NAN; /* past the grid (or NaN) */
    if (a < 0x1p-24) {
        s = v >= 0 ? 0.0 : -0x1p-23; /* 0 <= log1p(a) <= a */
    } else {
        uint64_t b;
        memcpy(&b, &a, sizeof b);
        const int64_t i = (int64_t)(b >> (52 - CT_MB)) - ((int64_t)(1023 + CT_EMIN) << CT_MB);
        if (v >= 0) {
            const double g = sh->slog_tab[i];
            s = g - g * 0x1p-40;
        } else {
            const double g = sh->slog_tab[i + 1]; /* the grid point above a */
            s = -(g + g * 0x1p-40);
        }
    }
    return (sh->zn[x] + sh->w[8] * s) - sh->ldl[ll];
}
static void cotoken_init(void *sv, const mer_ctx *c) {
    Cotoken *s = sv;
    Cotoken_lay(s, c);
    for (int32_t i = 0; i < c->n_keys; i++) s->pos[i] = -1;
    s->n = 0;
    s->sh = c->shared;
    if (!s->sh->ready) cotoken_shared_init(s->sh, c);
}
static void cotoken_begin(void *sv, int64_t t, const int32_t *keys, const int64_t *nu, int k) {
    Cotoken *s = sv;
    CotokenShared *sh = s->sh;
    (void)nu;
    if (sh->last_t == t) return; /* another cache of the pass saw step t first */
    sh->last_t = t;
    if (!sh->started) ct_start(sh);
    ct_visit(sh, keys, k);
    int32_t ll = keys[0] / sh->E;
    if (ll >= sh->nl) ll = sh->nl - 1;
    const int32_t layer = sh->layer0 + ll;
    if (sh->nb && layer != sh->cur) ct_observe(sh, keys, k, layer);
    sh->cur = layer;
    /* each layer's d = (its layer - cur - 1) mod L + 1 and whether it is still to come,
       for this step's scores (one modulo a step, not one per score) */
    int32_t r = (sh->layer0 - layer - 1) % sh->L;
    if (r < 0) r += sh->L;
    for (int32_t l2 = 0; l2 < sh->nl; l2++) {
        sh->ldl[l2] = sh->logd[r + 1];
        sh->later[l2] = sh->layer0 + l2 > layer;
        if (++r == sh->L) r = 0;
    }
    if (++sh->stamp == 0) { /* every 2^32 steps: forget every cached score */
        memset(sh->score_at, 0, sizeof(uint32_t) * sh->n_keys);
        sh->order_at = 0;
        sh->stamp = 1;
    }
}
static void cotoken_insert(void *sv, int32_t x) {
    Cotoken *s = sv;
    s->pos[x] = s->n;
    s->list[s->n++] = x;
}
static void cotoken_remove(void *sv, int32_t x) {
    Cotoken *s = sv;
    const int32_t i = s->pos[x], y = s->list[--s->n];
    s->list[i] = y;
    s->pos[y] = i;
    s->pos[x] = -1;
}
static int ct_rank_cmp(const void *a, const void *b) {
    const struct ct_rank *u = a, *v = b;
    if (u->s < v->s) return -1;
    if (u->s > v->s) return 1;
    return (u->x > v->x) - (u->x < v->x);
}
/* The victim search of the policies on this block (cotoken, knn): the resident unprotected
   key with the lowest score, ties to the smaller key (the Python classes' stable argsort).
   `score(ctx, x)` is a key's score this step; `lower(ctx, x, &exact)` a lower bound of it,
   or the score itself (exact = 1) where a bound would save nothing. Many caches side by
   side rank every key once a step, and each cache takes the first of its residents in
   that order. Inlined into each policy's evict with its own two functions. */
typedef double (*ct_score_fn)(void *ctx, int32_t x);
typedef double (*ct_lower_fn)(void *ctx, int32_t x, int *exact);
MER_INLINE int32_t ct_lowest(Cotoken *s, const mer_prot *p, void *ctx, ct_score_fn score,
                             ct_lower_fn lower) {
    CotokenShared *sh = s->sh;
    int32_t best = -1;
    double bs = 0.0;
    if (sh->sorted) {
        if (sh->order_at != sh->stamp) {
            for (int32_t x = 0; x < sh->n_keys; x++) {
                sh->order[x].s = score(ctx, x);
                sh->order[x].x = x;
            }
            qsort(sh->order, (size_t)sh->n_keys, sizeof(struct ct_rank), ct_rank_cmp);
            sh->order_at = sh->stamp;
        }
        for (int32_t i = 0; i < sh->n_keys; i++) {
            const int32_t x = sh->order[i].x;
            if (s->pos[x] >= 0 && !is_prot(p, x)) {
                best = x;
                break;
            }
        }
        if (best >= 0) cotoken_remove(s, best);
        return best;
    }
    /* exact scores first, then the others only where their lower bound does not exceed
       the best so far, the lowest bound first (a key whose bound is above the best scores
       above it too, so it can neither win nor tie) */
    struct ct_pend *pend = sh->pend;
    int32_t n_pend = 0, first = -1;
    for (int32_t i = 0; i < s->n; i++) {
        const int32_t x = s->list[i];
        if (is_prot(p, x)) continue;
        int exact;
        const double lb = lower(ctx, x, &exact);
        if (exact) {
            if (best < 0 || lb < bs || (lb == bs && x < best)) {
                best = x;
                bs = lb;
            }
        } else {
            if (first < 0 || lb < pend[first].lb) first = n_pend;
            pend[n_pend].lb = lb;
            pend[n_pend++].x = x;
        }
    }
    for (int32_t j = -1; j < n_pend; j++) { /* the lowest bound first, then the rest */
        if (j == first) continue;
        const struct ct_pend *q = &pend[j < 0 ? first : j];
        if (best >= 0 && q->lb > bs) continue;
        const int32_t x = q->x;
        const double v = score(ctx, x);
        if (best < 0 || v < bs || (v == bs && x < best)) {
            best = x;
            bs = v;
        }
    }
    if (best >= 0) cotoken_remove(s, best);
    return best;
}
static double ct_score_of(void *ctx, int32_t x) { return ct_score(ctx, x); }
/* ct_lower, or the score where it gives no bound (NaN) or the score is known already */
static double ct_lower_of(void *ctx, int32_t x, int *exact) {
    CotokenShared *sh = ctx;
    const double lb = ct_lower(sh, x);
    *exact = lb != lb || sh->score_at[x] == sh->stamp;
    return *exact ? ct_score(sh, x) : lb;
}
static int32_t cotoken_evict(void *sv, const mer_prot *p) {
    Cotoken *s = sv;
    return ct_lowest(s, p, s->sh, ct_score_of, ct_lower_of);
}
static void cotoken_free_shared(void *shv) {
    CotokenShared *sh = shv;
    if (!sh || !sh->ready) return;
    free(sh->LA);
    free(sh->LB);
    sh->LA = sh->LB = NULL;
}

static int cotoken_failed(const void *shv) {
    const CotokenShared *sh = shv;
    return sh && sh->ready && sh->oom;
}

static const mer_policy COTOKEN_POLICY = {
    "cotoken",
    "w0 w1 w2 w3 w4 w5 w6 w7 w8 rate_mid prior alpha n_layers n_experts",
    1, 0, Cotoken_size, cotoken_shared_size, cotoken_init, cotoken_begin, NULL, NULL,
    cotoken_evict, cotoken_remove, cotoken_insert, NULL, cotoken_free_shared, cotoken_failed,
};

/* == knn: cotoken's model plus the votes of past tokens, over three visits (mer/core/knn.py) == */
/* cotoken's shared block (its terms and naive Bayes, one per pass) followed by knn's: every
   token's picks as posting lists (the tokens that picked each key, ascending), and each past
   token's count of picks it shares with the current token (Python `_shared`), with a
   histogram of those counts over the voters [lo, tau - 1] (`window`). The vote of a key for
   successors sigma + a is the softmax(beta x shared)-weighted share of the voters whose
   successor picked it (Python `_vote`): the weights take one value per shared count, so
   each vote's weights are a table over counts, set once a step (its maximum and sum from
   the histogram), and a key's vote is a sum over its posting list. Scores are computed
   when a victim search first needs them in a step, with the Python expressions in the
   same order; numpy's BLAS sums are not these, so the two agree to rounding, and the
   tests hold their decisions equal (tests/test_knn_native.py). */

#define KN_VISITS 3
#define KN_NW 11 /* weights per visit (visit 1 uses the first 10) */
#define KN_EPS 0.02
#define KN_P0 (CT_NW + 5) /* params: cotoken's 14, then beta window visits w1_0..w3_10 */
/* the five votes: routed a = 1, 2, 3 (a layer routed in this token), to come a = 1, 2 */
#define KN_NV 5

typedef struct {
    int32_t *tok; /* ascending tokens that picked the key */
    int32_t n, cap;
} kn_post;

typedef struct {
    int on; /* a global view of two layers or more (Python: the token history is kept) */
    double beta;
    int64_t window;
    int visits;
    double w[KN_VISITS][KN_NW];
    double prior; /* log(k / E + eps): the vote where no voter has a usable successor */
    int64_t last_t;
    int32_t kt, kcur; /* this token's index (-1 before the first), the latest step's layer */
    int32_t *shared;  /* per past token (realloc'd) */
    int32_t tok_cap;
    int32_t lo;       /* the first voter (window) */
    int32_t *H;       /* voters [lo, kt - 1] per shared count (n_keys + 2) */
    int32_t hmax;
    uint8_t *row;     /* the current token's picks (n_keys) */
    kn_post *post;    /* n_keys */
    double *dl;       /* per local layer, this step: d of its next visit */
    double *wn;       /* KN_NV x (n_keys + 2): the votes' weights per shared count */
    int has[KN_NV];
    int32_t *tmp;     /* n_keys + 2 */
    uint32_t votes_at;
    /* per key, this step: the vote-free parts of its score (kn_parts) */
    double *pa, *pc;
    int8_t *pv;
    uint8_t *routed;
    uint32_t *parts_at;
    double lv_lo, lv_hi; /* the range of log(vote + eps) for kn_lower */
    int oom;
} KnnX;

typedef struct {
    int32_t *list, *pos; /* as Cotoken's (cotoken_insert / cotoken_remove serve both) */
    int32_t n;
    CotokenShared *sh;
    KnnX *kx;
} Knn;

DEFINE_SIZE_INIT(Knn, COTOKEN_ARRAYS) /* the same list and pos as Cotoken's */

#define KNNX_ARRAYS(s, a, c)                                                  \
    do {                                                                      \
        size_t nk_ = (size_t)(c)->n_keys, nl_ = (size_t)ct_nl(c);             \
        (s)->H = take((a), sizeof(int32_t) * (nk_ + 2));                      \
        (s)->tmp = take((a), sizeof(int32_t) * (nk_ + 2));                    \
        (s)->row = take((a), nk_);                                            \
        (s)->post = take((a), sizeof(kn_post) * nk_);                         \
        (s)->dl = take((a), sizeof(double) * nl_);                            \
        (s)->wn = take((a), sizeof(double) * KN_NV * (nk_ + 2));              \
        (s)->pa = take((a), sizeof(double) * KN_VISITS * nk_);                \
        (s)->pc = take((a), sizeof(double) * KN_VISITS * nk_);                \
        (s)->pv = take((a), KN_VISITS * nk_);                                 \
        (s)->routed = take((a), nk_);                                         \
        (s)->parts_at = take((a), sizeof(uint32_t) * nk_);                    \
    } while (0)
DEFINE_SIZE_INIT(KnnX, KNNX_ARRAYS)

static size_t knn_ct_bytes(const mer_ctx *c) { return (CotokenShared_size(c) + 63) & ~(size_t)63; }
static size_t knn_shared_size(const mer_ctx *c) { return knn_ct_bytes(c) + KnnX_size(c); }

static void knn_shared_init(CotokenShared *sh, const mer_ctx *c) {
    cotoken_shared_init(sh, c);
    KnnX *kx = (KnnX *)((char *)sh + knn_ct_bytes(c));
    KnnX_lay(kx, c);
    sh->ext = kx;
    const double *p = c->p;
    kx->on = sh->nb;
    kx->beta = p[KN_P0];
    kx->window = (int64_t)p[KN_P0 + 1];
    kx->visits = (int)p[KN_P0 + 2];
    if (kx->visits < 1) kx->visits = 1;
    if (kx->visits > KN_VISITS) kx->visits = KN_VISITS;
    int i = KN_P0 + 3;
    for (int j = 0; j < KN_VISITS; j++)
        for (int q = 0; q < (j ? KN_NW : KN_NW - 1); q++) kx->w[j][q] = p[i++];
    kx->w[0][KN_NW - 1] = 0.0;
    kx->prior = log((double)c->k / (double)sh->E + KN_EPS);
    kx->last_t = INT64_MIN;
    kx->kt = -1;
    kx->kcur = -1;
    kx->shared = NULL;
    kx->tok_cap = 0;
    kx->lo = 0;
    memset(kx->H, 0, sizeof(int32_t) * ((size_t)c->n_keys + 2));
    kx->hmax = 0;
    memset(kx->row, 0, (size_t)c->n_keys);
    memset(kx->post, 0, sizeof(kn_post) * (size_t)c->n_keys);
    kx->votes_at = 0;
    memset(kx->parts_at, 0, sizeof(uint32_t) * (size_t)c->n_keys);
    kx->lv_lo = log(KN_EPS);
    kx->lv_hi = log(1.0 + KN_EPS);
    kx->oom = 0;
}

static void knn_init(void *sv, const mer_ctx *c) {
    Knn *s = sv;
    Knn_lay(s, c);
    for (int32_t i = 0; i < c->n_keys; i++) s->pos[i] = -1;
    s->n = 0;
    s->sh = c->shared;
    s->kx = (KnnX *)((char *)c->shared + knn_ct_bytes(c));
    if (!s->sh->ready) knn_shared_init(s->sh, c);
}

/* A new token (Python `_new_token`): every past token shares nothing with it yet. */
static void kn_new_token(KnnX *kx, int32_t nk) {
    kx->kt++;
    const int32_t tau = kx->kt;
    if (tau >= kx->tok_cap) {
        int32_t cap = kx->tok_cap ? 2 * kx->tok_cap : 64;
        int32_t *sh = realloc(kx->shared, sizeof(int32_t) * (size_t)cap);
        if (!sh) {
            kx->oom = 1;
            kx->kt--;
            return;
        }
        kx->shared = sh;
        kx->tok_cap = cap;
    }
    kx->lo = kx->window > 0 && tau > kx->window ? (int32_t)(tau - kx->window) : 0;
    memset(kx->shared, 0, sizeof(int32_t) * (size_t)(tau + 1));
    for (int32_t s = 0; s <= kx->hmax; s++) kx->H[s] = 0;
    kx->H[0] = tau - kx->lo;
    kx->hmax = 0;
    memset(kx->row, 0, (size_t)nk);
}
/* The first index of a posting list at or after token `from`. */
static inline int32_t kn_first(const kn_post *pl, int32_t from) {
    int32_t a = 0, b = pl->n;
    while (a < b) {
        const int32_t m = a + (b - a) / 2;
        if (pl->tok[m] < from) a = m + 1;
        else b = m;
    }
    return a;
}
/* The token history's part of begin_step (Python Knn.begin_step, before cotoken's). */
static void kn_observe(KnnX *kx, const int32_t *keys, int k, int32_t layer, int32_t nk) {
    if (kx->kt < 0 || layer < kx->kcur) kn_new_token(kx, nk);
    if (kx->oom) return;
    kx->kcur = layer;
    const int32_t tau = kx->kt, lo = kx->lo;
    for (int r = 0; r < k; r++) {
        const int32_t y = keys[r];
        if (kx->row[y]) continue;
        kx->row[y] = 1;
        kn_post *pl = &kx->post[y];
        for (int32_t i = lo ? kn_first(pl, lo) : 0; i < pl->n; i++) {
            const int32_t sg = pl->tok[i];
            const int32_t v = kx->shared[sg]++;
            kx->H[v]--;
            kx->H[v + 1]++;
            if (v + 1 > kx->hmax) kx->hmax = v + 1;
        }
        if (pl->n == pl->cap) {
            int32_t cap = pl->cap ? 2 * pl->cap : 16;
            int32_t *t2 = realloc(pl->tok, sizeof(int32_t) * (size_t)cap);
            if (!t2) {
                kx->oom = 1;
                return;
            }
            pl->tok = t2;
            pl->cap = cap;
        }
        pl->tok[pl->n++] = tau;
    }
}
/* Each vote's weights per shared count for this step (Python `_vote`'s softmax):
   vote v is (a, routed) = (1, 1), (2, 1), (3, 1), (1, 0), (2, 0); its voters are
   sigma in [lo, hi], hi = tau - a (routed) or tau - a - 1 (a layer still to come). */
static void kn_votes(KnnX *kx) {
    const int32_t tau = kx->kt, lo = kx->lo, hm = kx->hmax;
    static const int A[KN_NV] = {1, 2, 3, 1, 2}, R[KN_NV] = {1, 1, 1, 0, 0};
    const size_t stride = (size_t)(hm + 2);
    for (int v = 0; v < KN_NV; v++) {
        const int32_t hi = R[v] ? tau - A[v] : tau - A[v] - 1;
        kx->has[v] = tau >= 0 && hi >= lo;
        if (!kx->has[v]) continue;
        int32_t *h = kx->tmp;
        memcpy(h, kx->H, sizeof(int32_t) * (size_t)(hm + 1));
        for (int32_t sg = hi + 1; sg < tau; sg++) h[kx->shared[sg]]--;
        double m = -INFINITY;
        for (int32_t s = 0; s <= hm; s++)
            if (h[s] > 0 && kx->beta * (double)s > m) m = kx->beta * (double)s;
        double *wn = kx->wn + (size_t)v * stride, z = 0.0;
        for (int32_t s = 0; s <= hm; s++) {
            wn[s] = exp(kx->beta * (double)s - m);
            if (h[s] > 0) z += (double)h[s] * wn[s];
        }
        for (int32_t s = 0; s <= hm; s++) wn[s] = wn[s] / z;
    }
}
/* log(vote + eps) of key x for each vote it needs (out[v], prior where none). */
static void kn_logvotes(KnnX *kx, int32_t x, int routed, double *out) {
    double sum[KN_NV] = {0.0, 0.0, 0.0, 0.0, 0.0};
    const int32_t tau = kx->kt, lo = kx->lo;
    const size_t stride = (size_t)(kx->hmax + 2);
    const int32_t *sh = kx->shared;
    const kn_post *pl = &kx->post[x];
    const int v0 = routed ? 0 : 3, v1 = routed ? 3 : 5;
    if (tau >= 0) {
        /* voters sigma = p - a in [lo, hi]: p <= tau always holds (postings end at this
           token), p <= tau - 1 for a layer still to come (it is not in this token yet);
           the first entries may lack p - a >= lo, the rest have it for every a */
        int32_t i = kn_first(pl, lo + 1);
        const int32_t *tk = pl->tok, n = pl->n;
        if (routed) {
            const double *w1 = kx->wn, *w2 = w1 + stride, *w3 = w2 + stride;
            for (; i < n && tk[i] - 3 < lo; i++) {
                const int32_t p = tk[i];
                sum[0] += w1[sh[p - 1]];
                if (p - 2 >= lo) sum[1] += w2[sh[p - 2]];
            }
            double s1 = sum[0], s2 = sum[1], s3 = sum[2];
            for (; i < n; i++) {
                const int32_t p = tk[i];
                s1 += w1[sh[p - 1]];
                s2 += w2[sh[p - 2]];
                s3 += w3[sh[p - 3]];
            }
            sum[0] = s1, sum[1] = s2, sum[2] = s3;
        } else {
            const double *w1 = kx->wn + 3 * stride, *w2 = w1 + stride;
            double s1 = 0.0, s2 = 0.0;
            for (; i < n; i++) {
                const int32_t p = tk[i];
                if (p > tau - 1) break;
                s1 += w1[sh[p - 1]];
                if (p - 2 >= lo) s2 += w2[sh[p - 2]];
            }
            sum[3] = s1, sum[4] = s2;
        }
    }
    for (int v = v0; v < v1; v++) out[v] = kx->has[v] && tau >= 0 ? log(sum[v] + KN_EPS) : kx->prior;
}
/* The parts of key x's score that need no vote, this step: z_j = a_j + c_j lv_{v_j} (v_j
   < 0: z_j = a_j), in the Python expression's order; cached per step. */
static inline void kn_parts(CotokenShared *sh, KnnX *kx, int32_t x) {
    if (kx->parts_at[x] == sh->stamp) return;
    if (kx->on && kx->votes_at != sh->stamp) {
        kn_votes(kx);
        kx->votes_at = sh->stamp;
    }
    ct_terms(sh, x);
    const int32_t ll = sh->kl[x];
    const int routed = !sh->later[ll];
    double *pa = kx->pa + (size_t)x * KN_VISITS, *pc = kx->pc + (size_t)x * KN_VISITS;
    int8_t *pv = kx->pv + (size_t)x * KN_VISITS;
    double f8 = 0.0;
    if (routed && sh->nb) {
        ct_catch_up(sh, x);
        if (sh->lp_at[x] != sh->tok) {
            sh->lp[x] = sh->LA[sh->n[x]] - sh->LA[sh->T - sh->n[x]];
            sh->lp_at[x] = sh->tok;
        }
        const double v = sh->lp[x] + sh->acc[x];
        f8 = v > 0 ? log1p(v) : v < 0 ? -log1p(-v) : 0.0;
    }
    for (int j = 0; j < kx->visits; j++) {
        const double *w = kx->w[j];
        if (routed) {
            pa[j] =
                (((w[4] + w[5] * sh->t1[x]) + w[6] * sh->t2[x]) + w[7] * sh->t3[x]) + w[8] * f8;
            pc[j] = w[9];
            pv[j] = (int8_t)j;
        } else {
            pa[j] = ((w[0] + w[1] * sh->t1[x]) + w[2] * sh->t2[x]) + w[3] * sh->t3[x];
            pc[j] = w[10];
            pv[j] = (int8_t)(j ? 3 + j - 1 : -1);
        }
    }
    kx->routed[x] = (uint8_t)routed;
    kx->parts_at[x] = sh->stamp;
}
/* Whether vote v of this step is a sum over voters (else the prior, exactly). */
static inline int kn_voted(const KnnX *kx, int v) { return kx->on && kx->kt >= 0 && kx->has[v]; }
/* log(sum_j sigmoid(z_j) / (d + j L)) with the votes' logarithms lv (Python `scores`). */
static inline double kn_density(const CotokenShared *sh, const KnnX *kx, int32_t x,
                                const double *lv) {
    const double *pa = kx->pa + (size_t)x * KN_VISITS, *pc = kx->pc + (size_t)x * KN_VISITS;
    const int8_t *pv = kx->pv + (size_t)x * KN_VISITS;
    const double d = kx->dl[sh->kl[x]], L = (double)sh->L;
    double dens = 0.0;
    for (int j = 0; j < kx->visits; j++) {
        const double z = pv[j] < 0 ? pa[j] : pa[j] + pc[j] * lv[pv[j]];
        dens += 1.0 / (1.0 + exp(-z)) / (d + (double)j * L);
    }
    return log(dens);
}
/* The log hit density of key x after this step's begin (Python `Knn.scores`). */
static inline double kn_score(CotokenShared *sh, KnnX *kx, int32_t x) {
    if (sh->score_at[x] == sh->stamp) return sh->score[x];
    kn_parts(sh, kx, x);
    double lv[KN_NV];
    for (int v = 0; v < KN_NV; v++) lv[v] = kx->prior;
    if (kx->on) kn_logvotes(kx, x, kx->routed[x], lv);
    const double sc = kn_density(sh, kx, x, lv);
    sh->score[x] = sc;
    sh->score_at[x] = sh->stamp;
    return sc;
}
/* A lower bound of kn_score(x) without its votes' sums (a vote is a share: 0 <= vote <= 1,
   so each log(vote + eps) lies in [log eps, log(1 + eps)] and z_j is monotone in it; every
   later operation is monotone too, and the bound is moved down by 1e-9, far more than
   any rounding), or the score itself where no vote needs a sum (then cached). */
static inline double kn_lower(CotokenShared *sh, KnnX *kx, int32_t x, int *exact) {
    *exact = 1;
    if (sh->score_at[x] == sh->stamp) return sh->score[x];
    kn_parts(sh, kx, x);
    const double *pc = kx->pc + (size_t)x * KN_VISITS;
    const int8_t *pv = kx->pv + (size_t)x * KN_VISITS;
    double lv[KN_NV];
    for (int v = 0; v < KN_NV; v++) lv[v] = kx->prior;
    int sums = 0;
    for (int j = 0; j < kx->visits; j++) {
        const int v = pv[j];
        if (v < 0 || !kn_voted(kx, v)) continue;
        sums = 1;
        lv[v] = pc[j] >= 0 ? kx->lv_lo : kx->lv_hi;
    }
    const double b = kn_density(sh, kx, x, lv);
    if (!sums) {
        sh->score[x] = b;
        sh->score_at[x] = sh->stamp;
        return b;
    }
    *exact = 0;
    return b - 1e-9;
}
static void knn_begin(void *sv, int64_t t, const int32_t *keys, const int64_t *nu, int k) {
    Knn *s = sv;
    CotokenShared *sh = s->sh;
    KnnX *kx = s->kx;
    if (kx->last_t == t) return; /* another cache of the pass saw step t first */
    kx->last_t = t;
    int32_t ll = keys[0] / sh->E;
    if (ll >= sh->nl) ll = sh->nl - 1;
    if (kx->on) kn_observe(kx, keys, k, sh->layer0 + ll, sh->n_keys);
    cotoken_begin(sv, t, keys, nu, k);
    if (sh->stamp == 1) { /* the first step, or cotoken's stamp wrapped: forget every part */
        memset(kx->parts_at, 0, sizeof(uint32_t) * (size_t)sh->n_keys);
        kx->votes_at = 0;
    }
    const int32_t layer = sh->layer0 + ll;
    int32_t r = (sh->layer0 - layer - 1) % sh->L;
    if (r < 0) r += sh->L;
    for (int32_t l2 = 0; l2 < sh->nl; l2++) {
        kx->dl[l2] = (double)(r + 1);
        if (++r == sh->L) r = 0;
    }
}
static double kn_score_of(void *ctx, int32_t x) {
    Knn *s = ctx;
    return kn_score(s->sh, s->kx, x);
}
static double kn_lower_of(void *ctx, int32_t x, int *exact) {
    Knn *s = ctx;
    return kn_lower(s->sh, s->kx, x, exact);
}
/* The lowest score among the unprotected residents (ct_lowest, with knn's score). */
static int32_t knn_evict(void *sv, const mer_prot *p) {
    return ct_lowest((Cotoken *)sv, p, sv, kn_score_of, kn_lower_of);
}
static void knn_free_shared(void *shv) {
    CotokenShared *sh = shv;
    if (!sh || !sh->ready) return;
    KnnX *kx = sh->ext;
    if (kx) {
        for (int32_t x = 0; x < sh->n_keys; x++) free(kx->post[x].tok);
        free(kx->shared);
        kx->shared = NULL;
    }
    cotoken_free_shared(shv);
}
static int knn_failed(const void *shv) {
    const CotokenShared *sh = shv;
    const KnnX *kx = sh && sh->ready ? sh->ext : NULL;
    return cotoken_failed(shv) || (kx && kx->oom);
}

static const mer_policy KNN_POLICY = {
    "knn",
    "w0 w1 w2 w3 w4 w5 w6 w7 w8 rate_mid prior alpha n_layers n_experts beta window visits "
    "w1_0 w1_1 w1_2 w1_3 w1_4 w1_5 w1_6 w1_7 w1_8 w1_9 "
    "w2_0 w2_1 w2_2 w2_3 w2_4 w2_5 w2_6 w2_7 w2_8 w2_9 w2_10 "
    "w3_0 w3_1 w3_2 w3_3 w3_4 w3_5 w3_6 w3_7 w3_8 w3_9 w3_10",
    1, 0, Knn_size, knn_shared_size, knn_init, knn_begin, NULL, NULL,
    knn_evict, cotoken_remove, cotoken_insert, NULL, knn_free_shared, knn_failed,
};

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

/* == the registry: one line per policy ============================================ */

static const mer_policy *const REGISTRY[] = {
    &LRU_POLICY, &FIFO_POLICY, &LFU_POLICY, &CLOCK_POLICY, &SIEVE_POLICY,
    &S3FIFO_POLICY, &ARC_POLICY, &OPT_POLICY, &SEED_POLICY, &CYCLE_POLICY,
    &COTOKEN_POLICY, &KNN_POLICY,
};
#define N_POLICIES ((int)(sizeof(REGISTRY) / sizeof(REGISTRY[0])))

int mer_replay_n_policies(void) { return N_POLICIES; }
int mer_replay_policy(const char *name) {
    for (int i = 0; i < N_POLICIES; i++)
        if (strcmp(REGISTRY[i]->name, name) == 0) return i;
    return -1;
}
static int valid(int i) { return i >= 0 && i < N_POLICIES; }
const char *mer_replay_policy_name(int i) { return valid(i) ? REGISTRY[i]->name : ""; }
const char *mer_replay_param_names(int i) { return valid(i) ? REGISTRY[i]->params : ""; }
int mer_replay_protects_step(int i) { return valid(i) ? REGISTRY[i]->protects_step : 0; }
int mer_replay_needs_future(int i) { return valid(i) ? REGISTRY[i]->needs_future : 0; }
int64_t mer_replay_state_bytes(int i, int k, int32_t n_keys) {
    if (!valid(i)) return -1;
    mer_ctx c = {1, n_keys, 0, k, NULL, NULL, NULL, 1};
    return (int64_t)((REGISTRY[i]->size(&c) + 63) & ~(size_t)63) + n_keys;
}

/* == next use of every lookup (OPT's order), one backward scan ==================== */

int mer_next_use(const int32_t *keys, int64_t n, int32_t n_keys, int64_t *out) {
    int64_t *last = malloc(sizeof(int64_t) * (n_keys > 0 ? n_keys : 1));
    if (!last) return -1;
    for (int32_t i = 0; i < n_keys; i++) last[i] = INF_POS;
    for (int64_t i = n - 1; i >= 0; i--) {
        int32_t x = keys[i];
        if (x < 0 || x >= n_keys) {
            free(last);
            return -3;
        }
        out[i] = last[x];
        last[x] = i;
    }
    free(last);
    return 0;
}

/* == the driver ==================================================================== */

/* Every step names k distinct keys (a token's top-k experts at one layer: the trace
   reader refuses anything else); the drivers and the policies' per-step loops rely on
   it. The first step that does not, or -1. */
static int64_t mer_first_repeat(const int32_t *keys, int64_t n_steps, int k) {
    for (int64_t i = 0; i < n_steps; i++) {
        const int32_t *s = keys + i * k;
        for (int r = 1; r < k; r++)
            for (int r2 = 0; r2 < r; r2++)
                if (s[r] == s[r2]) return i;
    }
    return -1;
}

struct Handle;
typedef int (*feed_fn)(struct Handle *h, const int32_t *keys, const int64_t *tidx,
                       const int64_t *next_use, int64_t n_steps, int8_t *outcome,
                       int32_t *victim);

typedef struct Handle {
    const mer_policy *pol;
    feed_fn feed; /* the driver instance for pol (set at the first feed) */
    int k, n_caches, n_params;
    int32_t n_keys, key_base, layer_div, n_layers_out;
    size_t stride;
    char *states;
    uint8_t *res;     /* n_caches x n_keys: resident */
    int32_t *n_res, *pin_res, *caps;
    int64_t *counts;  /* n_caches x 4 x n_layers_out */
    uint8_t *pinned;  /* NULL: no pins */
    uint32_t *mark;
    uint32_t stamp;
    double *params;
    void *shared;
    int64_t next_t;
    int32_t *missed;
    uint8_t *hitf;
    int32_t *lay; /* counter layer of every key: min(key / layer_div, n_layers_out - 1) */
} Handle;

void mer_replay_free(void *hv) {
    Handle *h = hv;
    if (!h) return;
    free(h->states);
    free(h->res);
    free(h->n_res);
    free(h->pin_res);
    free(h->caps);
    free(h->counts);
    free(h->pinned);
    free(h->mark);
    free(h->params);
    if (h->shared && h->pol->free_shared) h->pol->free_shared(h->shared);
    free(h->shared);
    free(h->missed);
    free(h->hitf);
    free(h->lay);
    free(h);
}

void *mer_replay_new(int policy, int k, int32_t n_keys, int32_t key_base, int32_t layer_div,
                     int32_t n_layers_out, const uint8_t *pinned, int n_caches,
                     const int32_t *caps, const double *params, int n_params) {
    if (!valid(policy) || k < 1 || n_keys < 1 || n_caches < 1 || layer_div < 1 ||
        n_layers_out < 1)
        return NULL;
    Handle *h = calloc(1, sizeof(Handle));
    if (!h) return NULL;
    h->pol = REGISTRY[policy];
    h->k = k;
    h->n_caches = n_caches;
    h->n_params = n_params;
    h->n_keys = n_keys;
    h->key_base = key_base;
    h->layer_div = layer_div;
    h->n_layers_out = n_layers_out;
    mer_ctx c0 = {1, n_keys, key_base, k, params, NULL, NULL, n_caches};
    h->stride = (h->pol->size(&c0) + 63) & ~(size_t)63;
    h->states = aligned_alloc(64, h->stride * (size_t)n_caches);
    h->res = calloc((size_t)n_caches * n_keys, 1);
    h->n_res = calloc(n_caches, sizeof(int32_t));
    h->pin_res = calloc(n_caches, sizeof(int32_t));
    h->caps = malloc(sizeof(int32_t) * n_caches);
    h->counts = calloc((size_t)n_caches * 4 * n_layers_out, sizeof(int64_t));
    h->mark = calloc(n_keys, sizeof(uint32_t));
    h->params = malloc(sizeof(double) * (size_t)(n_params > 0 ? n_params : 1) * n_caches);
    h->missed = malloc(sizeof(int32_t) * k);
    h->hitf = malloc(k);
    h->lay = malloc(sizeof(int32_t) * n_keys);
    if (pinned) {
        h->pinned = malloc(n_keys);
        if (h->pinned) memcpy(h->pinned, pinned, n_keys);
    }
    if (h->pol->shared_size) h->shared = calloc(1, h->pol->shared_size(&c0));
    if (!h->states || !h->res || !h->n_res || !h->pin_res || !h->caps || !h->counts ||
        !h->mark || !h->params || !h->missed || !h->hitf || !h->lay || (pinned && !h->pinned) ||
        (h->pol->shared_size && !h->shared)) {
        mer_replay_free(h);
        return NULL;
    }
    for (int32_t x = 0; x < n_keys; x++) {
        int32_t l = x / layer_div;
        h->lay[x] = l < n_layers_out ? l : n_layers_out - 1;
    }
    if (n_params > 0) memcpy(h->params, params, sizeof(double) * (size_t)n_params * n_caches);
    for (int c = 0; c < n_caches; c++) {
        h->caps[c] = caps[c];
        mer_ctx ctx = {caps[c], n_keys, key_base, k, h->params + (size_t)c * n_params,
                       h->pinned, h->shared, n_caches};
        h->pol->init(h->states + h->stride * c, &ctx);
    }
    h->stamp = 0;
    h->next_t = 0;
    return h;
}

/* The driver's loop, written once and instantiated per policy and per common k
   (FEED_VARIANTS below): with `pol` a constant the hooks are direct calls the
   compiler can inline, and with K a constant (0: read h->k) the per-step loops
   over the step's keys unroll. Every instance makes the same calls in the same
   order: only the code differs, never a decision. */
MER_INLINE int feed_impl(Handle *h, const mer_policy *pol, const int K,
                         const int32_t *keys_all, const int64_t *tidx,
                         const int64_t *next_use, int64_t n_steps, int8_t *outcome,
                         int32_t *victim) {
    const int k = K ? K : h->k, nc = h->n_caches, L = h->n_layers_out;
    const uint32_t nk = (uint32_t)h->n_keys;
    const uint8_t *pinned = h->pinned;
    const int32_t *lay = h->lay;
    const int protects = pol->protects_step;
    if (pol->needs_future && !next_use) return -1;
    if ((outcome || victim) && nc != 1) return -2;
    /* every key in range and no key twice in a step, before any state moves (loops
       without an early exit, which the compiler vectorises) */
    int out_of_range = 0, repeat = 0;
    for (int64_t i = 0; i < n_steps * k; i++) out_of_range |= (uint32_t)keys_all[i] >= nk;
    if (out_of_range) return -3;
    if (k == 2) {
        for (int64_t i = 0; i < n_steps; i++) repeat |= keys_all[2 * i] == keys_all[2 * i + 1];
    } else if (k > 2) {
        repeat = mer_first_repeat(keys_all, n_steps, k) >= 0;
    }
    if (repeat) return -5;
    mer_prot prot = {h->mark, 0, protects, pinned};
    /* per step: which ranks missed, which hit (on the stack when k is a constant) */
    int32_t missed_k[K ? K : 1];
    uint8_t hitf_k[K ? K : 1];
    int32_t *missed = K ? missed_k : h->missed;
    uint8_t *hitf = K ? hitf_k : h->hitf;
    int64_t next_t = h->next_t;
    for (int64_t i = 0; i < n_steps; i++) {
        const int32_t *keys = keys_all + i * k;
        const int64_t t = tidx ? tidx[i] : next_t;
        next_t = t + 1;
        const int64_t *nu = next_use ? next_use + i * k : NULL;
        if (protects) { /* the step's keys are protected: mark them */
            if (++h->stamp == 0) {
                memset(h->mark, 0, sizeof(uint32_t) * nk);
                h->stamp = 1;
            }
            for (int r = 0; r < k; r++) h->mark[keys[r]] = h->stamp;
            prot.stamp = h->stamp;
        }
        const int layer = lay[keys[0]];
        int8_t *out = outcome ? outcome + i * k : NULL;
        int32_t *vic = victim ? victim + i * k : NULL;
        if (vic)
            for (int r = 0; r < k; r++) vic[r] = -1;
        for (int c = 0; c < nc; c++) {
            void *s = h->states + h->stride * c;
            uint8_t *res = h->res + (size_t)c * nk;
            int64_t *cnt = h->counts + (size_t)c * 4 * L;
            const int32_t cap = h->caps[c];
            int32_t n_res = h->n_res[c], pin_res = h->pin_res[c];
            if (pol->begin) pol->begin(s, t, keys, nu, k);
            int nm = 0;
            for (int r = 0; r < k; r++) {
                int32_t x = keys[r];
                if (res[x]) {
                    hitf[r] = 1;
                    if (pol->hit) pol->hit(s, x);
                } else {
                    hitf[r] = 0;
                    missed[nm++] = r;
                }
            }
            cnt[layer] += k - nm;
            cnt[L + layer] += nm;
            for (int mi = 0; mi < nm; mi++) {
                const int r = missed[mi];
                const int32_t x = keys[r];
                if (pol->prepare) pol->prepare(s, x);
                if (n_res >= cap) {
                    int32_t v = -1;
                    if (protects) {
                        int32_t held = pin_res; /* protected residents */
                        for (int r2 = 0; r2 < k; r2++) {
                            int32_t y = keys[r2];
                            if (res[y] && !(pinned && pinned[y])) held++;
                        }
                        if (n_res > held) {
                            v = pol->evict(s, &prot);
                        } else {
                            /* a cache smaller than the step: the worst-ranked resident
                               step key (a hit of this step) ranked below this miss */
                            for (int r2 = k - 1; r2 > r; r2--) {
                                int32_t y = keys[r2];
                                if (res[y] && hitf[r2] && !(pinned && pinned[y])) {
                                    v = y;
                                    pol->remove(s, y);
                                    break;
                                }
                            }
                        }
                    } else {
                        v = pol->evict(s, &prot);
                    }
                    if (v < 0) {
                        cnt[3 * L + layer]++;
                        if (out) out[r] = 2;
                        continue;
                    }
                    if (vic) vic[r] = v;
                    res[v] = 0;
                    n_res--;
                    if (pinned && pinned[v]) pin_res--;
                    cnt[2 * L + lay[v]]++;
                }
                res[x] = 1;
                n_res++;
                if (pinned && pinned[x]) pin_res++;
                pol->insert(s, x);
                if (out) out[r] = 0;
            }
            h->n_res[c] = n_res;
            h->pin_res[c] = pin_res;
            if (pol->end) pol->end(s, t, keys, k);
            if (out) {
                for (int r = 0; r < k; r++) {
                    if (hitf[r]) out[r] = 1;
                    else if (out[r] == 0 && !res[keys[r]]) out[r] = 2; /* evicted again */
                }
            }
        }
    }
    h->next_t = next_t;
    return 0;
}

#define FEED_VARIANTS(FN, POL)                                                        \
    static int FN(Handle *h, const int32_t *keys, const int64_t *tidx,                \
                  const int64_t *nu, int64_t n, int8_t *out, int32_t *vic) {          \
        if (h->k == 2) return feed_impl(h, &POL, 2, keys, tidx, nu, n, out, vic);     \
        if (h->k == 1) return feed_impl(h, &POL, 1, keys, tidx, nu, n, out, vic);     \
        return feed_impl(h, &POL, 0, keys, tidx, nu, n, out, vic);                    \
    }
FEED_VARIANTS(feed_lru, LRU_POLICY)
FEED_VARIANTS(feed_fifo, FIFO_POLICY)
FEED_VARIANTS(feed_lfu, LFU_POLICY)
FEED_VARIANTS(feed_clock, CLOCK_POLICY)
FEED_VARIANTS(feed_sieve, SIEVE_POLICY)
FEED_VARIANTS(feed_s3fifo, S3FIFO_POLICY)
FEED_VARIANTS(feed_arc, ARC_POLICY)
FEED_VARIANTS(feed_opt, OPT_POLICY)
FEED_VARIANTS(feed_seed, SEED_POLICY)
FEED_VARIANTS(feed_cycle, CYCLE_POLICY)
FEED_VARIANTS(feed_cotoken, COTOKEN_POLICY)
FEED_VARIANTS(feed_knn, KNN_POLICY)

/* A policy without a line here runs the generic instance (same decisions, slower). */
static int feed_generic(Handle *h, const int32_t *keys, const int64_t *tidx,
                        const int64_t *nu, int64_t n, int8_t *out, int32_t *vic) {
    return feed_impl(h, h->pol, 0, keys, tidx, nu, n, out, vic);
}
static const struct {
    const mer_policy *pol;
    feed_fn feed;
} FEEDS[] = {
    {&LRU_POLICY, feed_lru},       {&FIFO_POLICY, feed_fifo},   {&LFU_POLICY, feed_lfu},
    {&CLOCK_POLICY, feed_clock},   {&SIEVE_POLICY, feed_sieve}, {&S3FIFO_POLICY, feed_s3fifo},
    {&ARC_POLICY, feed_arc},       {&OPT_POLICY, feed_opt},     {&SEED_POLICY, feed_seed},
    {&CYCLE_POLICY, feed_cycle},   {&COTOKEN_POLICY, feed_cotoken}, {&KNN_POLICY, feed_knn},
};
static feed_fn feed_of(const mer_policy *pol) {
    for (size_t i = 0; i < sizeof(FEEDS) / sizeof(FEEDS[0]); i++)
        if (FEEDS[i].pol == pol) return FEEDS[i].feed;
    return feed_generic;
}

int mer_replay_feed(void *hv, const int32_t *keys_all, const int64_t *tidx,
                    const int64_t *next_use, int64_t n_steps, int8_t *outcome,
                    int32_t *victim) {
    Handle *h = hv;
    if (!h->feed) h->feed = feed_of(h->pol);
    int rc = h->feed(h, keys_all, tidx, next_use, n_steps, outcome, victim);
    if (rc == 0 && h->pol->failed && h->pol->failed(h->shared)) return -4; /* out of memory */
    return rc;
}

void mer_replay_counts(void *hv, int c, int64_t *out) {
    Handle *h = hv;
    memcpy(out, h->counts + (size_t)c * 4 * h->n_layers_out,
           sizeof(int64_t) * 4 * h->n_layers_out);
}

void mer_replay_resident(void *hv, int c, uint8_t *out) {
    Handle *h = hv;
    memcpy(out, h->res + (size_t)c * h->n_keys, h->n_keys);
}
