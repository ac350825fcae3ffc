/* The simulator's prefetch-on step in C (see simstep.c, simstep.py). Also the cffi cdef. */

typedef struct {
    /* the replay */
    int32_t policy;          /* index in replay.c's registry (a step-protecting policy) */
    int32_t k;               /* keys per step */
    int32_t n_layers, n_experts;
    int32_t global_scope;    /* 1: one partition over every key; 0: one per layer */
    int32_t n_params;        /* parameters per partition row */
    int32_t prefetch_slots;  /* speculative budget per partition (0: none) */
    int32_t prefetch_reclaim;
    int32_t max_inflight;    /* prefetches in flight at most */
    int32_t hold;            /* a guess is outstanding at most this many steps (0: no cap) */
    /* the timing, in ticks (sim/model.py `_Timing`) */
    int64_t dense, ffn, ffn_busy, poll, step, submit, complete;
    int64_t ffn_wake, dense_wake; /* after the driver blocked for weights (`_Timing`) */
    int32_t workers, seed, channels, chunks;
    int64_t chunk, lag, access;
    /* the shared device (SharedSSD): ticks for k = 1..n_share chunks submitted together to
       land; n_share 0: the channel model (AnalyticSSD) */
    const int64_t *share;
    int64_t n_share;
} mer_sim_cfg;

typedef struct {
    int64_t *per_step;     /* n_steps x 10: iter, io, comp, n_busy, over, hits, late, pf, reads,
                              dense */
    int64_t *read_issued;  /* per read, in issue order (room for max_reads) */
    int32_t *read_key;
    int64_t *read_step;
    int64_t *read_finish;
    int64_t max_reads;
    int64_t n_reads;       /* out */
    int64_t *obs_a;        /* the driver's reaping windows (workers == 1), room for max_obs */
    int64_t *obs_b;
    int64_t *obs_p;
    int64_t max_obs;
    int64_t n_obs;         /* out */
    int64_t *stats;        /* 8 x n_layers: CacheStats.COUNTERS in order */
    int64_t end;           /* out: the simulated end (ticks) */
} mer_sim_out;

/* Run a whole trace: `steps` (n_steps x k global keys, each step one partition's),
   the prefetch proposals of step t (keys w_key[w_off[t]:w_off[t+1]], each aimed at
   step w_target[...]), static pins (n_layers*n_experts bytes or NULL), one row of
   policy parameters and one capacity per partition. 0 ok; -1 out of memory;
   -2 an output array is too small; -3 a key out of range. */
int mer_sim_run(const mer_sim_cfg *cfg, const int32_t *steps, int64_t n_steps,
                const int64_t *w_off, const int32_t *w_key, const int64_t *w_target,
                const uint8_t *pinned, const double *params, const int32_t *caps,
                mer_sim_out *out);
