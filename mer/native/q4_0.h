/* q4_0 / q8_0 weight x q8_0 activation matmuls and the fused SwiGLU expert FFN (see q4_0.py).
   Also the cffi cdef: plain declarations only.

   Weights are ggml blocks of 32, rows back to back (GGUF order, ggml ne[0] = n_cols):
   wtype 2 = q4_0 (18 bytes: fp16 d, 16 bytes of nibbles), wtype 8 = q8_0 (34 bytes: fp16 d,
   32 int8). Activations x are float32, token-major: x[t * n_cols + c]; outputs y[t * n_rows + r].
   Return values: 0 ok, -1 bad argument, -2 out of memory. */

/* The instruction set a call uses: 1 portable C, 2 AVX2 (+FMA, F16C), 3 AVX-512 VNNI (+BW, VL). */
int mer_q_isa(void);
/* The best instruction set this CPU supports (what mer_q_isa returns unless lowered). */
int mer_q_isa_best(void);
/* Use at most `isa` from now on (tests, benchmarks); returns the one in use. 0 = best. */
int mer_q_set_isa(int isa);

/* q8_0 of n_tok rows of n_cols floats (n_cols a multiple of 32), in natural element order:
   qs[t * n_cols + c], d[t * nb + b], sums[t * nb + b] = sum of the block's 32 codes. */
int mer_q_quantize_q8_0(const float *x, int64_t n_tok, int64_t n_cols, int8_t *qs, float *d,
                        int32_t *sums);

/* y = W x for n_tok tokens: W is n_rows x n_cols of `wtype`. Each weight is read from memory
   once whatever n_tok is. Rows are split over n_threads (the calling thread is one of them). */
int mer_q_matmul(int wtype, const uint8_t *w, int64_t n_rows, int64_t n_cols, const float *x,
                 int64_t n_tok, float *y, int n_threads);

/* y = down(silu(gate x) * (up x)): gate, up are d_ff x d_model, down is d_model x d_ff, each
   of its own wtype. Gate and up go in one pass over their rows, then down. If h is not NULL the
   hidden activations silu(gate x) * (up x) are also written there (h[t * d_ff + i]). */
int mer_q_ffn(int gate_type, const uint8_t *gate, int up_type, const uint8_t *up, int down_type,
              const uint8_t *down, int64_t d_model, int64_t d_ff, const float *x, int64_t n_tok,
              float *y, float *h, int n_threads);

/* Sum of the n bytes at p read as 64-bit words (then the < 8 trailing bytes), on n_threads: a streaming read of memory at
   the speed the same instruction set can load it (the kernel's physical limit). */
uint64_t mer_q_memread(const uint8_t *p, int64_t n, int n_threads);

/* Threads the pool has started so far (it grows to the largest n_threads asked, then stays). */
int mer_q_pool_threads(void);
/* Counters of the calls split over threads, since the last reset (reset != 0 zeroes them
   after reading): out[0] jobs split, out[1] chunks the calling thread did, out[2] chunks the
   workers did, out[3] ns the calling thread waited, its own chunks done, for the workers' last. */
void mer_q_pool_stats(int64_t *out, int reset);
