/* Stack-distance histograms (see stackdist.py). Also the cffi cdef: plain declarations only. */
int mer_lru_hist(const int32_t *flat, int64_t n_steps, int k, int32_t n_keys,
                 int64_t *hist, int64_t cap);
int mer_opt_hist(const int32_t *flat, const int64_t *nval, int64_t n_steps, int k,
                 int32_t n_keys, int64_t *hist, int64_t cap);
