/* Compiled hit-only replays of the core's eviction policies (see replay.c, replay.py).
   Also the cffi cdef: plain declarations only. */

/* The registry: policy index by name (-1 if it has no compiled loop), its
   parameter names (attributes of the Python policy object, space-separated, in
   the order replay_new's `params` rows hold them), and two flags. */
int mer_replay_policy(const char *name);
const char *mer_replay_policy_name(int policy);
const char *mer_replay_param_names(int policy);
int mer_replay_protects_step(int policy);
int mer_replay_needs_future(int policy);
int mer_replay_n_policies(void);
/* Bytes of one cache's state (for memory budgets of many caches side by side). */
int64_t mer_replay_state_bytes(int policy, int k, int32_t n_keys);

/* One pass over a trace with `n_caches` caches of one policy side by side.
   Keys are 0..n_keys-1 (one partition's keys); `key_base` is added back where a
   policy needs the global key. `pinned` (n_keys bytes or NULL) are static pins;
   `params` holds n_caches rows of the policy's parameters. Returns NULL when
   out of memory. */
void *mer_replay_new(int policy, int k, int32_t n_keys, int32_t key_base,
                     int32_t layer_div, int32_t n_layers_out, const uint8_t *pinned,
                     int n_caches, const int32_t *caps, const double *params,
                     int n_params);

/* Feed the next `n_steps` steps: keys (n_steps * k), their step indices t
   (NULL: consecutive from the last fed), the next-use position of every lookup
   (NULL unless the policy needs the future), and optionally each lookup's
   outcome (n_steps * k bytes; only with one cache): 1 hit, 0 miss read into a
   slot, 2 miss that bypassed the cache (no victim, or evicted again within
   its step); and optionally the key each miss evicted (n_steps * k, -1 none;
   only with one cache). */
int mer_replay_feed(void *h, const int32_t *keys, const int64_t *tidx,
                    const int64_t *next_use, int64_t n_steps, int8_t *outcome,
                    int32_t *victim);

/* Counters of cache c, per output layer: hits, misses, evictions, bypass
   (4 x n_layers_out int64), and its resident keys (n_keys bytes). */
void mer_replay_counts(void *h, int c, int64_t *out);
void mer_replay_resident(void *h, int c, uint8_t *out);
void mer_replay_free(void *h);

/* out[i] = the next position j > i with keys[j] == keys[i], else 1 << 62. */
int mer_next_use(const int32_t *keys, int64_t n, int32_t n_keys, int64_t *out);
