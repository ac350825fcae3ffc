/* io_uring helpers (see mer/engine/uring.py). Also the cffi cdef: plain declarations only. */
typedef struct mer_ring mer_ring;

int mer_ring_init(mer_ring **out, unsigned entries, unsigned flags);
void mer_ring_free(mer_ring *r);
unsigned mer_ring_sq_entries(mer_ring *r);
unsigned mer_ring_cq_entries(mer_ring *r);
unsigned mer_ring_features(mer_ring *r);
unsigned mer_ring_setup_flags(mer_ring *r);
unsigned mer_ring_sq_space(mer_ring *r);
unsigned mer_ring_unsubmitted(mer_ring *r);
int mer_ring_taskrun_pending(mer_ring *r);

int mer_ring_register_buffers(mer_ring *r, const uint64_t *addrs, const uint64_t *lens,
                              unsigned n);
int mer_ring_unregister_buffers(mer_ring *r);

unsigned mer_ring_prep_reads(mer_ring *r, unsigned n, const int32_t *fds,
                             const uint64_t *offsets, const uint64_t *addrs,
                             const uint32_t *lens, const int32_t *buf_index,
                             const uint64_t *user_data);
int mer_ring_enter(mer_ring *r, unsigned min_complete, int wait);
unsigned mer_ring_reap(mer_ring *r, uint64_t *user_data, int32_t *res, unsigned max);

int mer_probe_io_uring(void);
