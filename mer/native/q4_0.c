/* q4_0 / q8_0 matmuls and the fused SwiGLU expert FFN, in ggml's arithmetic (see q4_0.py).

   Arithmetic (what q4_0.py emulates): each token's activations are quantised per block of 32
   to q8_0 (d = max|x| / 127, q = round-half-even(x * (1 / d)), clamped to +-127); per block the
   weight codes and the activation codes meet in an exact integer dot product; that integer is
   scaled by one fp32 product of the two block scales (fp16 weight scale widened, fp32
   activation scale) and accumulated in fp32. The order of the fp32 accumulation is the only
   thing that differs between the instruction sets.

   One translation unit holds three variants of the row kernel (portable C, AVX2, AVX-512
   VNNI), each compiled for its instruction set with a per-function target attribute; the first
   call picks the best one the CPU supports (__builtin_cpu_supports), so one build serves any
   x86-64 CPU (other architectures get the portable C). Rows are split over a persistent pool of
   pthreads, started on first use and grown to the largest thread count asked for; the calling
   thread is worker 0. Scratch (quantised activations, the FFN's hidden vector) lives in a
   per-calling-thread arena that only grows, so a call allocates nothing once warm. */

#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "q4_0.h"

#if defined(__x86_64__) || defined(__i386__)
#define MER_X86 1
#include <immintrin.h>
#define TGT2 __attribute__((target("avx2,fma,f16c")))
#define TGT512 \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define INL static inline __attribute__((always_inline))
#else
#define MER_X86 0
#endif

#define QK 32
#define Q4_0_TYPE 2
#define Q8_0_TYPE 8
#define Q4_BYTES 18
#define Q8_BYTES 34
#define MAX_THREADS 64
#ifndef PF_DIST
#define PF_DIST 8192 /* bytes ahead that weight rows are prefetched (measured best on Zen 5) */
#endif
#define TOK_GROUP 4                   /* tokens per pass over a row held in registers */
#define MIN_BYTES_PER_THREAD (1 << 20) /* below this per thread, a hand-off costs more than it saves */
#define TILE_BYTES (256 << 10)          /* weights per row tile when tokens need several passes */
#define COL_BLOCKS 128                  /* blocks per column chunk of a batch over long rows */
#define ROW_TILE 64                     /* rows per tile when rows go in column chunks */
#define CHUNK_BYTES (256 << 10)         /* weights per chunk that a thread claims at a time */

enum { ISA_PORTABLE = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };

/* ---- fp16 -------------------------------------------------------------------------------- */

static inline uint16_t rd16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* IEEE half -> float, exact for every input (subnormals, inf, nan). */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do {
            man <<= 1;
            e++;
        } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---- activations ------------------------------------------------------------------------- */

typedef struct {
    const int8_t *qn;    /* codes, natural order (block b at qn + 32 b) */
    const int8_t *qp;    /* the AVX-512 q4_0 layout (quad_layout), NULL when not needed */
    const float *d;      /* block scales */
    const int32_t *negs; /* minus the sum of each block's codes */
} act_t;

/* q8_0 of one row of n_cols floats: the definition q4_0.py's quantize_q8_0 emulates. */
static void quantize_row(const float *x, int64_t n_cols, int8_t *qs, float *d, int32_t *sums) {
    int64_t nb = n_cols / QK;
    for (int64_t b = 0; b < nb; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        int bad = 0;
        for (int j = 0; j < QK; j++) {
            float a = fabsf(xb[j]);
            if (a > amax) amax = a;
            if (a != a) bad = 1;
        }
        float db = bad ? NAN : amax / 127.0f;
        float id = (db != 0.0f && !bad) ? 1.0f / db : 0.0f;
        int32_t s = 0;
        for (int j = 0; j < QK; j++) {
            float v = xb[j] * id;
            if (v != v) v = 0.0f;
            if (v > 127.0f) v = 127.0f;
            if (v < -127.0f) v = -127.0f;
            int32_t q = (int32_t)rintf(v);
            qs[b * QK + j] = (int8_t)q;
            s += q;
        }
        d[b] = db;
        sums[b] = s;
    }
}

/* The AVX-512 q4_0 layout: per group of four blocks, the first halves (elements 0..15) of the
   four blocks, then their second halves, to meet one 512-bit register of each block's low
   nibbles and one of its high nibbles; blocks after the last full group stay natural. */
#if MER_X86
/* The same quantiser, 32 floats at a time: every step is the scalar one's (the products
   x * (1/d) are the same IEEE operations, and the conversion rounds half to even as rintf). */
TGT512 static void quantize_row_512(const float *x, int64_t n_cols, int8_t *qs, float *d,
                                    int32_t *sums) {
    int64_t nb = n_cols / QK;
    const __m512 lim = _mm512_set1_ps(127.0f), nlim = _mm512_set1_ps(-127.0f);
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int64_t b = 0; b < nb; b++) {
        __m512 v0 = _mm512_loadu_ps(x + b * QK), v1 = _mm512_loadu_ps(x + b * QK + 16);
        __mmask16 nan = _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q);
        float db, id;
        if (nan) {
            db = NAN;
            id = 0.0f;
        } else {
            __m512 m = _mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1));
            float amax = _mm512_reduce_max_ps(m);
            db = amax / 127.0f;
            id = db != 0.0f ? 1.0f / db : 0.0f;
        }
        __m512 iv = _mm512_set1_ps(id);
        __m512 q0 = _mm512_mul_ps(v0, iv), q1 = _mm512_mul_ps(v1, iv);
        q0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(q0, q0, _CMP_ORD_Q), q0);
        q1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(q1, q1, _CMP_ORD_Q), q1);
        q0 = _mm512_min_ps(_mm512_max_ps(q0, nlim), lim);
        q1 = _mm512_min_ps(_mm512_max_ps(q1, nlim), lim);
        __m512i i0 = _mm512_cvtps_epi32(q0), i1 = _mm512_cvtps_epi32(q1);
        _mm_storeu_si128((__m128i *)(qs + b * QK), _mm512_cvtsepi32_epi8(i0));
        _mm_storeu_si128((__m128i *)(qs + b * QK + 16), _mm512_cvtsepi32_epi8(i1));
        d[b] = db;
        sums[b] = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    }
}
#endif

static void quantize_rows(int isa, const float *x, int64_t n_cols, int8_t *qs, float *d,
                          int32_t *sums) {
#if MER_X86
    if (isa == ISA_AVX512) {
        quantize_row_512(x, n_cols, qs, d, sums);
        return;
    }
#endif
    (void)isa;
    quantize_row(x, n_cols, qs, d, sums);
}

static void quad_layout(const int8_t *qn, int64_t nb, int8_t *qp) {
    int64_t b = 0;
    for (; b + 3 < nb; b += 4)
        for (int i = 0; i < 4; i++) {
            memcpy(qp + b * QK + i * 16, qn + (b + i) * QK, 16);
            memcpy(qp + b * QK + 64 + i * 16, qn + (b + i) * QK + 16, 16);
        }
    if (b < nb) memcpy(qp + b * QK, qn + b * QK, (size_t)(nb - b) * QK);
}

/* ---- per-calling-thread scratch arena ----------------------------------------------------- */

typedef struct {
    void *p;
    size_t n;
} arena_t;

static pthread_key_t g_arena_key;
static pthread_once_t g_arena_once = PTHREAD_ONCE_INIT;

static void arena_free(void *v) {
    arena_t *a = v;
    if (a) {
        free(a->p);
        free(a);
    }
}

static void arena_init(void) { pthread_key_create(&g_arena_key, arena_free); }

static void *arena_get(size_t n) {
    pthread_once(&g_arena_once, arena_init);
    arena_t *a = pthread_getspecific(g_arena_key);
    if (!a) {
        a = calloc(1, sizeof(*a));
        if (!a) return NULL;
        pthread_setspecific(g_arena_key, a);
    }
    if (a->n < n) {
        void *p = NULL;
        size_t want = n + n / 4;
        if (posix_memalign(&p, 64, want) != 0) return NULL;
        free(a->p);
        a->p = p;
        a->n = want;
    }
    return a->p;
}

static inline size_t up64(size_t n) { return (n + 63) & ~(size_t)63; }

static size_t acts_bytes(int64_t n_tok, int64_t n_cols, int pairs) {
    int64_t nb = n_cols / QK;
    size_t per = up64((size_t)n_cols) * (pairs ? 2 : 1) + up64((size_t)nb * 4) * 2;
    return up64(sizeof(act_t) * (size_t)n_tok) + per * (size_t)n_tok;
}

/* Quantise n_tok rows into `mem` (acts_bytes large); returns the act_t array. */
static act_t *acts_fill(int isa, char *mem, const float *x, int64_t n_tok, int64_t n_cols,
                        int pairs) {
    int64_t nb = n_cols / QK;
    act_t *acts = (act_t *)mem;
    char *p = mem + up64(sizeof(act_t) * (size_t)n_tok);
    for (int64_t t = 0; t < n_tok; t++) {
        int8_t *qn = (int8_t *)p;
        p += up64((size_t)n_cols);
        int8_t *qp = NULL;
        if (pairs) {
            qp = (int8_t *)p;
            p += up64((size_t)n_cols);
        }
        float *d = (float *)p;
        p += up64((size_t)nb * 4);
        int32_t *negs = (int32_t *)p;
        p += up64((size_t)nb * 4);
        quantize_rows(isa, x + t * n_cols, n_cols, qn, d, negs);
        for (int64_t b = 0; b < nb; b++) negs[b] = -negs[b];
        if (pairs) quad_layout(qn, nb, qp);
        acts[t].qn = qn;
        acts[t].qp = qp;
        acts[t].d = d;
        acts[t].negs = negs;
    }
    return acts;
}

/* ---- row kernels: res[k] = row . token k, for K <= TOK_GROUP tokens ------------------------ */


static inline int32_t dot_q4_block(const uint8_t *qs, const int8_t *x) {
    int32_t s = 0;
    for (int j = 0; j < 16; j++)
        s += ((int32_t)(qs[j] & 15) - 8) * x[j] + ((int32_t)(qs[j] >> 4) - 8) * x[j + 16];
    return s;
}

static inline int32_t dot_q8_block(const uint8_t *qs, const int8_t *x) {
    /* Read the codes through an int8_t pointer: GCC 12 at -O3 with AVX-512 VNNI turned the
       equivalent (int8_t)qs[j] cast into an unsigned dot product (vpdpbusd), a wrong result. */
    const int8_t *w = (const int8_t *)qs;
    int32_t s = 0;
    for (int j = 0; j < QK; j++) s += (int32_t)w[j] * (int32_t)x[j];
    return s;
}

/* The integer dot of one block of either type with 32 activation codes. */
static inline int32_t dot_block(int q4, const uint8_t *qs, const int8_t *x) {
    return q4 ? dot_q4_block(qs, x) : dot_q8_block(qs, x);
}

static inline void row_c(int q4, const uint8_t *row, int64_t nb, const act_t *a, int K,
                         float *res) {
    const int64_t bb = q4 ? Q4_BYTES : Q8_BYTES;
    for (int k = 0; k < K; k++) res[k] = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = row + b * bb;
        float dw = f16_to_f32(rd16(p));
        for (int k = 0; k < K; k++)
            res[k] += (dw * a[k].d[b]) * (float)dot_block(q4, p + 2, a[k].qn + b * QK);
    }
}

typedef void (*rowsfn_t)(const uint8_t *w, int64_t rb, int64_t r0, int64_t r1, int64_t nb,
                         const act_t *a, int K, float *out, int64_t os);

static inline void rows_c(int q4, const uint8_t *w, int64_t rb, int64_t r0, int64_t r1,
                          int64_t nb, const act_t *a, int K, float *out, int64_t os) {
    float res[TOK_GROUP];
    for (int64_t r = r0; r < r1; r++) {
        row_c(q4, w + r * rb, nb, a, K, res);
        for (int k = 0; k < K; k++) out[k * os + (r - r0)] = res[k];
    }
}

static void rows_q4_c(const uint8_t *w, int64_t rb, int64_t r0, int64_t r1, int64_t nb,
                      const act_t *a, int K, float *out, int64_t os) {
    rows_c(1, w, rb, r0, r1, nb, a, K, out, os);
}

static void rows_q8_c(const uint8_t *w, int64_t rb, int64_t r0, int64_t r1, int64_t nb,
                      const act_t *a, int K, float *out, int64_t os) {
    rows_c(0, w, rb, r0, r1, nb, a, K, out, os);
}

#if MER_X86

TGT2 INL float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* AVX2: per block, the codes as signed bytes meet the activation codes through ggml's sign
   trick (maddubs needs one unsigned operand), giving 8 int32 partial sums. q4: the nibbles
   spread to bytes minus 8; q8: the bytes as they are. A prefetch every 4 (q4) or 2 (q8)
   blocks keeps one 128-byte step ahead per 72 or 68 bytes read. */
TGT2 INL void row_avx2_k(const int q4, const uint8_t *row, int64_t nb, const act_t *a,
                         const int K, float *res) {
    __m256 acc[TOK_GROUP];
    for (int k = 0; k < K; k++) acc[k] = _mm256_setzero_ps();
    const __m128i m4 = _mm_set1_epi8(15);
    const __m256i off = _mm256_set1_epi8(8);
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t bb = q4 ? Q4_BYTES : Q8_BYTES;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *p = row + b * bb;
        if (!(b & (q4 ? 3 : 1))) {
            _mm_prefetch((const char *)(p + PF_DIST), _MM_HINT_T0);
            _mm_prefetch((const char *)(p + PF_DIST + 64), _MM_HINT_T0);
        }
        __m256i v;
        if (q4) {
            __m128i c = _mm_loadu_si128((const __m128i *)(p + 2));
            v = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(c, 4), m4), _mm_and_si128(c, m4));
            v = _mm256_sub_epi8(v, off);
        } else {
            v = _mm256_loadu_si256((const __m256i *)(p + 2));
        }
        __m256i av = _mm256_sign_epi8(v, v);
        float dw = _cvtsh_ss(rd16(p));
        for (int k = 0; k < K; k++) {
            __m256i X = _mm256_loadu_si256((const __m256i *)(a[k].qn + b * QK));
            __m256i d16 = _mm256_maddubs_epi16(av, _mm256_sign_epi8(X, v));
            __m256i d32 = _mm256_madd_epi16(d16, ones);
            acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(dw * a[k].d[b]), _mm256_cvtepi32_ps(d32), acc[k]);
        }
    }
    for (int k = 0; k < K; k++) res[k] = hsum256(acc[k]);
}

TGT2 INL void row_q4_avx2_k(const uint8_t *row, int64_t nb, const act_t *a, const int K,
                            float *res) {
    row_avx2_k(1, row, nb, a, K, res);
}

TGT2 INL void row_q8_avx2_k(const uint8_t *row, int64_t nb, const act_t *a, const int K,
                            float *res) {
    row_avx2_k(0, row, nb, a, K, res);
}

/* AVX-512 VNNI, q4_0: four blocks per step. Their 16-byte code runs fill one 512-bit
   register; its low nibbles (elements 0..15 of each block) and high nibbles (16..31) go
   straight, unsigned (0..15), into two vpdpbusd against the activation codes, whose
   accumulator starts at -8 * sum(codes) of each block (lane 0 of the block's four lanes), so
   the "- 8" costs no per-weight work. The four fp16 scales come out of one 64-byte load by a
   word permute. */
TGT512 INL void row_q4_512_k(const uint8_t *row, int64_t nb, const act_t *a, const int K,
                             float *res) {
    __m512 acc[TOK_GROUP];
    for (int k = 0; k < K; k++) acc[k] = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(15);
    /* lane i <- i / 4: a block's value under its four lanes (with mask 0x1111: lane 4j <- j) */
    const __m512i sidx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    /* words 0, 9, 18, 27 of the 64 bytes at a group's start are its four scales */
    const __m512i widx = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                          0, 0, 0, 0, 0, 0, 0, 0, 0, 27, 18, 9, 0);
    int64_t b = 0;
    for (; b + 3 < nb; b += 4) {
        const uint8_t *p = row + b * Q4_BYTES;
        _mm_prefetch((const char *)(p + PF_DIST), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + PF_DIST + 64), _MM_HINT_T0);
        __m512i V = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p + 2)));
        V = _mm512_inserti32x4(V, _mm_loadu_si128((const __m128i *)(p + 2 + Q4_BYTES)), 1);
        V = _mm512_inserti32x4(V, _mm_loadu_si128((const __m128i *)(p + 2 + 2 * Q4_BYTES)), 2);
        V = _mm512_inserti32x4(V, _mm_loadu_si128((const __m128i *)(p + 2 + 3 * Q4_BYTES)), 3);
        __m512i lo = _mm512_and_si512(V, m4);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(V, 4), m4);
        __m512i R = _mm512_loadu_si512((const void *)p);
        __m128 dw = _mm_cvtph_ps(_mm512_castsi512_si128(_mm512_permutexvar_epi16(widx, R)));
        for (int k = 0; k < K; k++) {
            const int8_t *q = a[k].qp + b * QK;
            __m512i C = _mm512_maskz_permutexvar_epi32(
                0x1111, sidx, _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(a[k].negs + b))));
            __m512i I = _mm512_dpbusd_epi32(_mm512_slli_epi32(C, 3), lo, _mm512_loadu_si512((const void *)q));
            I = _mm512_dpbusd_epi32(I, hi, _mm512_loadu_si512((const void *)(q + 64)));
            __m128 s = _mm_mul_ps(dw, _mm_loadu_ps(a[k].d + b));
            __m512 S = _mm512_permutexvar_ps(sidx, _mm512_castps128_ps512(s));
            acc[k] = _mm512_fmadd_ps(S, _mm512_cvtepi32_ps(I), acc[k]);
        }
    }
    float tail[TOK_GROUP] = {0};
    for (; b < nb; b++) {
        const uint8_t *p = row + b * Q4_BYTES;
        float dw = _cvtsh_ss(rd16(p));
        for (int k = 0; k < K; k++)
            tail[k] += (dw * a[k].d[b]) * (float)dot_q4_block(p + 2, a[k].qn + b * QK);
    }
    for (int k = 0; k < K; k++) res[k] = _mm512_reduce_add_ps(acc[k]) + tail[k];
}

/* AVX-512 VNNI, q8_0: the signed weights get +128 (xor 0x80) to be vpdpbusd's unsigned
   operand, and the accumulator starts at -128 * sum(codes) of the block. */
TGT512 INL void row_q8_512_k(const uint8_t *row, int64_t nb, const act_t *a, const int K,
                             float *res) {
    __m512 acc[TOK_GROUP];
    for (int k = 0; k < K; k++) acc[k] = _mm512_setzero_ps();
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const __m512i sidx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i cidx = sidx; /* lane 0 <- block b, lane 8 <- block b+1 (others masked) */
    int64_t b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *p = row + b * Q8_BYTES;
        _mm_prefetch((const char *)(p + PF_DIST), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + PF_DIST + 64), _MM_HINT_T0);
        __m512i W = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p + 2))),
            _mm256_loadu_si256((const __m256i *)(p + 2 + Q8_BYTES)), 1);
        W = _mm512_xor_si512(W, flip);
        __m128 dw = _mm_cvtph_ps(
            _mm_cvtsi32_si128((int)((uint32_t)rd16(p) | ((uint32_t)rd16(p + Q8_BYTES) << 16))));
        for (int k = 0; k < K; k++) {
            __m512i X = _mm512_loadu_si512((const void *)(a[k].qn + b * QK));
            __m512i I = _mm512_maskz_permutexvar_epi32(
                0x0101, cidx, _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(a[k].negs + b))));
            I = _mm512_dpbusd_epi32(_mm512_slli_epi32(I, 7), W, X);
            __m128 s = _mm_mul_ps(dw, _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(a[k].d + b))));
            __m512 S = _mm512_permutexvar_ps(sidx, _mm512_castps128_ps512(s));
            acc[k] = _mm512_fmadd_ps(S, _mm512_cvtepi32_ps(I), acc[k]);
        }
    }
    float tail[TOK_GROUP] = {0};
    if (b < nb) {
        const uint8_t *p = row + b * Q8_BYTES;
        float dw = _cvtsh_ss(rd16(p));
        for (int k = 0; k < K; k++)
            tail[k] = (dw * a[k].d[b]) * (float)dot_q8_block(p + 2, a[k].qn + b * QK);
    }
    for (int k = 0; k < K; k++) res[k] = _mm512_reduce_add_ps(acc[k]) + tail[k];
}

/* One entry per kernel over a range of rows; K is a constant in each case, so the
   accumulators stay in registers. out[k * os + (r - r0)] = row r . token k. */
#define ROWS_CASE(kern, KK)                                    \
    case KK:                                                   \
        for (int64_t r = r0; r < r1; r++) {                    \
            kern(w + r * rb, nb, a, KK, res);                  \
            for (int k = 0; k < KK; k++) out[k * os + (r - r0)] = res[k]; \
        }                                                      \
        break;
#define ROWS_FN(TGT, name, kern)                                                          \
    TGT static void name(const uint8_t *w, int64_t rb, int64_t r0, int64_t r1, int64_t nb, \
                         const act_t *a, int K, float *out, int64_t os) {                 \
        float res[TOK_GROUP];                                                             \
        switch (K) {                                                                      \
            ROWS_CASE(kern, 1)                                                            \
            ROWS_CASE(kern, 2)                                                            \
            ROWS_CASE(kern, 3)                                                            \
            ROWS_CASE(kern, 4)                                                            \
        }                                                                                 \
    }

ROWS_FN(TGT2, rows_q4_avx2, row_q4_avx2_k)
ROWS_FN(TGT2, rows_q8_avx2, row_q8_avx2_k)
ROWS_FN(TGT512, rows_q4_512, row_q4_512_k)
ROWS_FN(TGT512, rows_q8_512, row_q8_512_k)
#endif /* MER_X86 */

/* ---- instruction-set dispatch ------------------------------------------------------------- */

static int g_isa_best = 0;
static int g_isa = 0;
static pthread_once_t g_isa_once = PTHREAD_ONCE_INIT;

static void isa_init(void) {
    int best = ISA_PORTABLE;
#if MER_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
        best = ISA_AVX2;
    if (best == ISA_AVX2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni"))
        best = ISA_AVX512;
#endif
    g_isa_best = best;
    const char *env = getenv("MER_Q4_ISA");
    int want = best;
    if (env) {
        if (!strcmp(env, "portable")) want = ISA_PORTABLE;
        else if (!strcmp(env, "avx2")) want = ISA_AVX2;
        else if (!strcmp(env, "avx512vnni")) want = ISA_AVX512;
    }
    g_isa = want < best ? want : best;
}

int mer_q_isa(void) {
    pthread_once(&g_isa_once, isa_init);
    return __atomic_load_n(&g_isa, __ATOMIC_RELAXED);
}

int mer_q_isa_best(void) {
    pthread_once(&g_isa_once, isa_init);
    return g_isa_best;
}

int mer_q_set_isa(int isa) {
    pthread_once(&g_isa_once, isa_init);
    int v = (isa <= 0 || isa > g_isa_best) ? g_isa_best : isa;
    __atomic_store_n(&g_isa, v, __ATOMIC_RELAXED);
    return v;
}

static rowsfn_t rows_fn(int isa, int wtype) {
#if MER_X86
    if (isa == ISA_AVX512) return wtype == Q4_0_TYPE ? rows_q4_512 : rows_q8_512;
    if (isa == ISA_AVX2) return wtype == Q4_0_TYPE ? rows_q4_avx2 : rows_q8_avx2;
#endif
    (void)isa;
    return wtype == Q4_0_TYPE ? rows_q4_c : rows_q8_c;
}

static int64_t type_block_bytes(int wtype) {
    return wtype == Q4_0_TYPE ? Q4_BYTES : (wtype == Q8_0_TYPE ? Q8_BYTES : 0);
}

/* ---- the thread pool ----------------------------------------------------------------------- */

/* A job is n_items (rows, or lines of memory) in chunks of `chunk`; fn(ctx, i0, i1) does items
   [i0, i1). The calling thread and the workers claim chunks one at a time from one atomic word,
   so a thread that starts late (woken late, or sharing its core with another process) takes
   fewer chunks instead of holding the others up; which thread computes a row never changes
   its result. The word packs the job's generation, its thread count, its chunk count and the
   next chunk, so a claim is valid only for the job it was read from: the caller waits for its
   chunks to be done, never for a worker that has not shown up. Idle workers spin for a short
   while (the FFN's second matrix and the next expert come microseconds later) and then sleep
   on a condition variable. */
typedef void (*job_fn)(void *ctx, int64_t i0, int64_t i1);

#define GEN_SHIFT 32
#define NTH_SHIFT 24
#define NCH_SHIFT 12
#define FIELD12 0xfffu
#define MAX_CHUNKS 4095
#ifndef SPIN_NS
#define SPIN_NS 100000 /* idle spin before sleeping: covers the gaps inside and between FFN calls */
#endif

static struct {
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    pthread_mutex_t busy; /* one dispatch at a time; a concurrent caller runs inline */
    int started;
    uint64_t claim;   /* atomic: gen << 32 | nth << 24 | n_chunks << 12 | next chunk */
    int sleepers;     /* atomic: workers waiting on `go` */
    int64_t done_n;   /* atomic: chunks of the current job done */
    job_fn fn;
    void *ctx;
    int64_t n_items, chunk;
    int64_t stats[4]; /* see mer_q_pool_stats; written by the dispatching thread only */
} P = {.mu = PTHREAD_MUTEX_INITIALIZER,
       .go = PTHREAD_COND_INITIALIZER,
       .done = PTHREAD_COND_INITIALIZER,
       .busy = PTHREAD_MUTEX_INITIALIZER};

static pthread_once_t g_fork_once = PTHREAD_ONCE_INIT;

/* A forked child has none of the parent's workers: start from an empty pool. */
static void pool_after_fork(void) {
    pthread_mutex_init(&P.mu, NULL);
    pthread_mutex_init(&P.busy, NULL);
    pthread_cond_init(&P.go, NULL);
    pthread_cond_init(&P.done, NULL);
    P.started = 0;
    P.claim = 0;
    P.sleepers = 0;
    P.done_n = 0;
}

static void fork_init(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

static inline void cpu_relax(void) {
#if MER_X86
    __builtin_ia32_pause();
#endif
}

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Claim chunks of the job whose claim word had generation `gen` until none is left; returns
   how many this thread did. fn, ctx, n_items and chunk are read only after a successful claim:
   the job cannot be replaced while one of its chunks is not done. */
static int64_t pool_claim(uint64_t gen, int tid) {
    int64_t did = 0;
    uint64_t c = __atomic_load_n(&P.claim, __ATOMIC_ACQUIRE);
    for (;;) {
        if ((c >> GEN_SHIFT) != gen || (int)((c >> NTH_SHIFT) & 0xff) <= tid) return did;
        uint64_t n = (c >> NCH_SHIFT) & FIELD12, next = c & FIELD12;
        if (next >= n) return did;
        if (!__atomic_compare_exchange_n(&P.claim, &c, c + 1, 1, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue; /* c now holds the current word */
        int64_t i0 = (int64_t)next * P.chunk, i1 = i0 + P.chunk;
        if (i1 > P.n_items) i1 = P.n_items;
        P.fn(P.ctx, i0, i1);
        did++;
        if (__atomic_add_fetch(&P.done_n, 1, __ATOMIC_ACQ_REL) == (int64_t)n) {
            pthread_mutex_lock(&P.mu);
            pthread_cond_signal(&P.done);
            pthread_mutex_unlock(&P.mu);
        }
        c = __atomic_load_n(&P.claim, __ATOMIC_ACQUIRE);
    }
}

static void *pool_worker(void *arg) {
    int tid = (int)(intptr_t)arg;
    uint64_t seen = __atomic_load_n(&P.claim, __ATOMIC_ACQUIRE) >> GEN_SHIFT;
    for (;;) {
        uint64_t gen;
        int64_t t0 = now_ns();
        for (int spin = 1;; spin++) {
            gen = __atomic_load_n(&P.claim, __ATOMIC_ACQUIRE) >> GEN_SHIFT;
            if (gen != seen) break;
            cpu_relax();
            if (!(spin & 255) && now_ns() - t0 > SPIN_NS) {
                pthread_mutex_lock(&P.mu);
                __atomic_add_fetch(&P.sleepers, 1, __ATOMIC_SEQ_CST);
                while ((gen = __atomic_load_n(&P.claim, __ATOMIC_SEQ_CST) >> GEN_SHIFT) == seen)
                    pthread_cond_wait(&P.go, &P.mu);
                __atomic_sub_fetch(&P.sleepers, 1, __ATOMIC_SEQ_CST);
                pthread_mutex_unlock(&P.mu);
                break;
            }
        }
        seen = gen;
        pool_claim(gen, tid);
    }
    return NULL;
}

/* With P.mu held: make sure workers 1 .. n-1 exist; returns how many threads can run. */
static int pool_grow(int n) {
    if (n > MAX_THREADS) n = MAX_THREADS;
    if (P.started == 0) P.started = 1; /* worker 0 is the caller */
    if (P.started >= n) return n;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* signals stay with the interpreter's threads */
    while (P.started < n) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&th, &attr, pool_worker, (void *)(intptr_t)P.started);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        P.started++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return P.started < n ? P.started : n;
}

/* fn over items [0, n_items) in chunks of at least `chunk`, on up to nth threads. */
static void pool_run(job_fn fn, void *ctx, int64_t n_items, int64_t chunk, int nth) {
    if (n_items <= 0) return;
    if (chunk < 1) chunk = 1;
    if (n_items / chunk >= MAX_CHUNKS) chunk = (n_items + MAX_CHUNKS - 1) / MAX_CHUNKS;
    int64_t n_chunks = (n_items + chunk - 1) / chunk;
    if (nth > n_chunks) nth = (int)n_chunks;
    if (nth > 1) {
        pthread_once(&g_fork_once, fork_init);
        if (pthread_mutex_trylock(&P.busy) == 0) {
            pthread_mutex_lock(&P.mu);
            nth = pool_grow(nth);
            pthread_mutex_unlock(&P.mu);
            if (nth > 1) {
                P.fn = fn;
                P.ctx = ctx;
                P.n_items = n_items;
                P.chunk = chunk;
                __atomic_store_n(&P.done_n, 0, __ATOMIC_RELAXED);
                uint64_t gen = ((__atomic_load_n(&P.claim, __ATOMIC_RELAXED) >> GEN_SHIFT) + 1) &
                               0xffffffffu;
                uint64_t word = gen << GEN_SHIFT | (uint64_t)nth << NTH_SHIFT |
                                (uint64_t)n_chunks << NCH_SHIFT;
                __atomic_store_n(&P.claim, word, __ATOMIC_SEQ_CST);
                if (__atomic_load_n(&P.sleepers, __ATOMIC_SEQ_CST) > 0) {
                    pthread_mutex_lock(&P.mu);
                    pthread_cond_broadcast(&P.go);
                    pthread_mutex_unlock(&P.mu);
                }
                int64_t mine = pool_claim(gen, 0);
                /* the last chunks may still run on a worker: spin briefly, then sleep */
                int64_t t0 = now_ns();
                for (int spin = 1; __atomic_load_n(&P.done_n, __ATOMIC_ACQUIRE) < n_chunks; spin++) {
                    cpu_relax();
                    if (!(spin & 255) && now_ns() - t0 > SPIN_NS) {
                        pthread_mutex_lock(&P.mu);
                        while (__atomic_load_n(&P.done_n, __ATOMIC_ACQUIRE) < n_chunks)
                            pthread_cond_wait(&P.done, &P.mu);
                        pthread_mutex_unlock(&P.mu);
                        break;
                    }
                }
                P.stats[0]++;
                P.stats[1] += mine;
                P.stats[2] += n_chunks - mine;
                P.stats[3] += now_ns() - t0;
                pthread_mutex_unlock(&P.busy);
                return;
            }
            pthread_mutex_unlock(&P.busy);
        }
    }
    fn(ctx, 0, n_items);
}

void mer_q_pool_stats(int64_t *out, int reset) {
    pthread_mutex_lock(&P.busy);
    for (int i = 0; i < 4; i++) {
        out[i] = P.stats[i];
        if (reset) P.stats[i] = 0;
    }
    pthread_mutex_unlock(&P.busy);
}

int mer_q_pool_threads(void) {
    pthread_mutex_lock(&P.mu);
    int n = P.started;
    pthread_mutex_unlock(&P.mu);
    return n;
}

static int threads_for(int n_threads, int64_t n_rows, int64_t bytes) {
    int64_t n = n_threads < 1 ? 1 : n_threads;
    int64_t by_size = bytes / MIN_BYTES_PER_THREAD;
    if (by_size < 1) by_size = 1;
    if (n > by_size) n = by_size;
    if (n > n_rows) n = n_rows;
    if (n > MAX_THREADS) n = MAX_THREADS;
    return n < 1 ? 1 : (int)n;
}

/* ---- matmul -------------------------------------------------------------------------------- */

typedef struct {
    rowsfn_t fn;
    const uint8_t *w;
    int64_t n_rows, nb, rb, n_tok;
    const act_t *acts;
    float *y;
} mm_job;

/* Rows per tile: a tile of weights stays in L2 while every group of tokens passes over it. */
static int64_t tile_rows(int64_t rb, int64_t n_tok) {
    if (n_tok <= TOK_GROUP) return INT64_MAX;
    int64_t t = TILE_BYTES / (rb > 0 ? rb : 1);
    return t < 1 ? 1 : t;
}

/* The activations of a group of tokens over part of a row: blocks c0.. of each token. */
static void acts_shift(const act_t *a, int K, int64_t c0, act_t *out) {
    for (int k = 0; k < K; k++) {
        out[k].qn = a[k].qn + c0 * QK;
        out[k].qp = a[k].qp ? a[k].qp + c0 * QK : NULL; /* c0 % 4 == 0: a quad boundary */
        out[k].d = a[k].d + c0;
        out[k].negs = a[k].negs + c0;
    }
}

static void mm_rows(const mm_job *j, int64_t r0, int64_t r1) {
    int64_t tile = tile_rows(j->rb, j->n_tok);
    /* Several tokens over long rows: their activations would not stay in L1 together, so the
       rows are taken in column chunks, the partial sums added up in `part`. */
    int64_t cb = j->n_tok > 1 && j->nb > COL_BLOCKS ? COL_BLOCKS : j->nb;
    if (cb < j->nb && tile > ROW_TILE) tile = ROW_TILE;
    int64_t bb = j->rb / (j->nb > 0 ? j->nb : 1); /* bytes per block */
    float part[TOK_GROUP * ROW_TILE];
    act_t sub[TOK_GROUP];
    for (int64_t a = r0, e; a < r1; a = e) {
        e = r1 - a <= tile ? r1 : a + tile;
        for (int64_t t0 = 0; t0 < j->n_tok; t0 += TOK_GROUP) {
            int K = (int)(j->n_tok - t0 < TOK_GROUP ? j->n_tok - t0 : TOK_GROUP);
            float *yk = j->y + t0 * j->n_rows;
            if (cb == j->nb) {
                j->fn(j->w, j->rb, a, e, j->nb, j->acts + t0, K, yk + a, j->n_rows);
                continue;
            }
            for (int64_t c0 = 0; c0 < j->nb; c0 += cb) {
                int64_t nbc = j->nb - c0 < cb ? j->nb - c0 : cb;
                acts_shift(j->acts + t0, K, c0, sub);
                j->fn(j->w + c0 * bb, j->rb, a, e, nbc, sub, K, part, ROW_TILE);
                for (int k = 0; k < K; k++)
                    for (int64_t r = a; r < e; r++) {
                        float v = part[k * ROW_TILE + (r - a)];
                        yk[k * j->n_rows + r] = c0 ? yk[k * j->n_rows + r] + v : v;
                    }
            }
        }
    }
}

static void mm_worker(void *ctx, int64_t r0, int64_t r1) { mm_rows(ctx, r0, r1); }

/* Rows per claimed chunk: about CHUNK_BYTES of weights (a whole number of tiles). */
static int64_t chunk_rows(int64_t rb, int64_t tile) {
    int64_t c = CHUNK_BYTES / (rb > 0 ? rb : 1);
    if (tile < INT64_MAX && c > tile) c = c / tile * tile;
    return c < 1 ? 1 : c;
}

static int check_shape(int wtype, int64_t n_rows, int64_t n_cols, int64_t n_tok) {
    if (type_block_bytes(wtype) == 0) return -1;
    if (n_rows < 0 || n_cols < 0 || n_tok < 0 || n_cols % QK) return -1;
    return 0;
}

int mer_q_matmul(int wtype, const uint8_t *w, int64_t n_rows, int64_t n_cols, const float *x,
                 int64_t n_tok, float *y, int n_threads) {
    if (check_shape(wtype, n_rows, n_cols, n_tok)) return -1;
    if (n_rows == 0 || n_tok == 0) return 0;
    int isa = mer_q_isa();
    int pairs = isa == ISA_AVX512 && wtype == Q4_0_TYPE;
    char *mem = arena_get(acts_bytes(n_tok, n_cols, pairs));
    if (!mem) return -2;
    int64_t nb = n_cols / QK;
    mm_job j = {rows_fn(isa, wtype), w, n_rows, nb, nb * type_block_bytes(wtype), n_tok, NULL, y};
    j.acts = acts_fill(isa, mem, x, n_tok, n_cols, pairs);
    pool_run(mm_worker, &j, n_rows, chunk_rows(j.rb, tile_rows(j.rb, n_tok)),
             threads_for(n_threads, n_rows, n_rows * j.rb));
    return 0;
}

int mer_q_quantize_q8_0(const float *x, int64_t n_tok, int64_t n_cols, int8_t *qs, float *d,
                        int32_t *sums) {
    if (n_tok < 0 || n_cols < 0 || n_cols % QK) return -1;
    int64_t nb = n_cols / QK;
    int isa = mer_q_isa();
    for (int64_t t = 0; t < n_tok; t++)
        quantize_rows(isa, x + t * n_cols, n_cols, qs + t * n_cols, d + t * nb, sums + t * nb);
    return 0;
}

/* ---- the fused SwiGLU expert FFN ------------------------------------------------------------ */

/* h[i] = silu(h[i]) * u[i] = h / (1 + exp(-h)) * u */
typedef void (*silufn_t)(float *h, const float *u, int64_t n);

static void silu_mul_c(float *h, const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) h[i] = h[i] / (1.0f + expf(-h[i])) * u[i];
}

#if MER_X86
/* exp by 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p its Taylor polynomial to degree 7
   (relative error < 1e-8 before rounding, a few ulp after), then scalef. */
TGT512 static void silu_mul_512(float *h, const float *u, int64_t n) {
    const __m512 log2e = _mm512_set1_ps(1.44269504f), ln2hi = _mm512_set1_ps(0.693145752f),
                 ln2lo = _mm512_set1_ps(1.42860677e-06f), hi = _mm512_set1_ps(88.5f),
                 lo = _mm512_set1_ps(-88.5f), one = _mm512_set1_ps(1.0f);
    const float c[8] = {1.0f, 1.0f, 0.5f, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040};
    for (int64_t i = 0; i < n; i += 16) {
        /* the last partial vector is masked, so every element takes the same steps wherever a
           tile boundary falls: the result does not depend on how rows are split over threads */
        __mmask16 m = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 g = _mm512_maskz_loadu_ps(m, h + i);
        __m512 x = _mm512_min_ps(_mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), g), lo), hi);
        __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_fnmadd_ps(k, ln2hi, x);
        r = _mm512_fnmadd_ps(k, ln2lo, r);
        __m512 p = _mm512_set1_ps(c[7]);
        for (int j = 6; j >= 0; j--) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[j]));
        __m512 e = _mm512_scalef_ps(p, k);
        __m512 y = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_maskz_loadu_ps(m, u + i));
        _mm512_mask_storeu_ps(h + i, m, y);
    }
}
#endif

static silufn_t silu_fn(int isa) {
#if MER_X86
    if (isa == ISA_AVX512) return silu_mul_512;
#endif
    (void)isa;
    return silu_mul_c;
}

typedef struct {
    rowsfn_t gfn, ufn;
    silufn_t silu;
    const uint8_t *gate, *up;
    int64_t d_ff, nb, grb, urb, n_tok;
    const act_t *acts;
    float *h;
} gu_job;

#define GU_TILE 64 /* rows of gate and up per step: then silu * up on the tile */


static void gu_worker(void *ctx, int64_t r0, int64_t r1) {
    const gu_job *j = ctx;
    float ub[TOK_GROUP * GU_TILE];
    int64_t tile = tile_rows(j->grb + j->urb, j->n_tok);
    if (tile > GU_TILE) tile = GU_TILE;
    for (int64_t a = r0, e; a < r1; a = e) {
        e = r1 - a <= tile ? r1 : a + tile;
        for (int64_t t0 = 0; t0 < j->n_tok; t0 += TOK_GROUP) {
            int K = (int)(j->n_tok - t0 < TOK_GROUP ? j->n_tok - t0 : TOK_GROUP);
            float *hk = j->h + t0 * j->d_ff;
            j->gfn(j->gate, j->grb, a, e, j->nb, j->acts + t0, K, hk + a, j->d_ff);
            j->ufn(j->up, j->urb, a, e, j->nb, j->acts + t0, K, ub, GU_TILE);
            for (int k = 0; k < K; k++) j->silu(hk + k * j->d_ff + a, ub + k * GU_TILE, e - a);
        }
    }
}

int mer_q_ffn(int gate_type, const uint8_t *gate, int up_type, const uint8_t *up, int down_type,
              const uint8_t *down, int64_t d_model, int64_t d_ff, const float *x, int64_t n_tok,
              float *y, float *h, int n_threads) {
    if (check_shape(gate_type, d_ff, d_model, n_tok) || check_shape(up_type, d_ff, d_model, n_tok) ||
        check_shape(down_type, d_model, d_ff, n_tok))
        return -1;
    if (n_tok == 0 || d_model == 0) return 0;
    int isa = mer_q_isa();
    int pairs_in = isa == ISA_AVX512 && (gate_type == Q4_0_TYPE || up_type == Q4_0_TYPE);
    int pairs_h = isa == ISA_AVX512 && down_type == Q4_0_TYPE;
    size_t a_in = acts_bytes(n_tok, d_model, pairs_in);
    size_t a_h = acts_bytes(n_tok, d_ff, pairs_h);
    size_t h_bytes = h ? 0 : up64((size_t)(n_tok * d_ff) * sizeof(float));
    char *mem = arena_get(a_in + a_h + h_bytes);
    if (!mem) return -2;
    float *hh = h ? h : (float *)(mem + a_in + a_h);
    int64_t nbm = d_model / QK, nbf = d_ff / QK;
    if (d_ff > 0) {
        gu_job g = {rows_fn(isa, gate_type), rows_fn(isa, up_type), silu_fn(isa), gate, up, d_ff, nbm,
                    nbm * type_block_bytes(gate_type), nbm * type_block_bytes(up_type), n_tok,
                    NULL, hh};
        g.acts = acts_fill(isa, mem, x, n_tok, d_model, pairs_in);
        pool_run(gu_worker, &g, d_ff, chunk_rows(g.grb + g.urb, GU_TILE),
                 threads_for(n_threads, d_ff, d_ff * (g.grb + g.urb)));
    }
    mm_job dn = {rows_fn(isa, down_type), down, d_model, nbf, nbf * type_block_bytes(down_type),
                 n_tok, NULL, y};
    dn.acts = acts_fill(isa, mem + a_in, hh, n_tok, d_ff, pairs_h);
    pool_run(mm_worker, &dn, d_model, chunk_rows(dn.rb, tile_rows(dn.rb, n_tok)),
             threads_for(n_threads, d_model, d_model * dn.rb));
    return 0;
}

/* ---- memory read bandwidth: the physical limit the kernel is measured against ------------- */

static uint64_t read_c(const uint8_t *p, int64_t n) {
    uint64_t s0 = 0, s1 = 0, w0, w1;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        memcpy(&w0, p + i, 8);
        memcpy(&w1, p + i + 8, 8);
        s0 += w0;
        s1 += w1;
    }
    if (i + 8 <= n) {
        memcpy(&w0, p + i, 8);
        s0 += w0;
        i += 8;
    }
    for (; i < n; i++) s0 += p[i];
    return s0 + s1;
}

#if MER_X86
TGT2 static uint64_t read_avx2(const uint8_t *p, int64_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 128 <= n; i += 128) {
        _mm_prefetch((const char *)(p + i + PF_DIST), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + i + PF_DIST + 64), _MM_HINT_T0);
        a0 = _mm256_add_epi64(a0, _mm256_loadu_si256((const __m256i *)(p + i)));
        a1 = _mm256_add_epi64(a1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_add_epi64(a2, _mm256_loadu_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_add_epi64(a3, _mm256_loadu_si256((const __m256i *)(p + i + 96)));
    }
    __m256i a = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    uint64_t v[4];
    _mm256_storeu_si256((__m256i *)v, a);
    return v[0] + v[1] + v[2] + v[3] + read_c(p + i, n - i);
}

TGT512 static uint64_t read_512(const uint8_t *p, int64_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 256 <= n; i += 256) {
        for (int l = 0; l < 256; l += 64) _mm_prefetch((const char *)(p + i + PF_DIST + l), _MM_HINT_T0);
        a0 = _mm512_add_epi64(a0, _mm512_loadu_si512((const void *)(p + i)));
        a1 = _mm512_add_epi64(a1, _mm512_loadu_si512((const void *)(p + i + 64)));
        a2 = _mm512_add_epi64(a2, _mm512_loadu_si512((const void *)(p + i + 128)));
        a3 = _mm512_add_epi64(a3, _mm512_loadu_si512((const void *)(p + i + 192)));
    }
    __m512i a = _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3));
    return (uint64_t)_mm512_reduce_add_epi64(a) + read_c(p + i, n - i);
}
#endif

typedef struct {
    const uint8_t *p;
    int64_t n;
    int isa;
    uint64_t sum; /* atomic; a sum mod 2^64 is the same whatever the split */
} rd_job;

/* Lines [l0, l1) of 64 bytes (the last one may be short). */
static void rd_worker(void *ctx, int64_t l0, int64_t l1) {
    rd_job *j = ctx;
    int64_t a = l0 * 64, b = l1 * 64 > j->n ? j->n : l1 * 64;
    uint64_t s;
#if MER_X86
    if (j->isa == ISA_AVX512) s = read_512(j->p + a, b - a);
    else if (j->isa == ISA_AVX2) s = read_avx2(j->p + a, b - a);
    else s = read_c(j->p + a, b - a);
#else
    s = read_c(j->p + a, b - a);
#endif
    __atomic_add_fetch(&j->sum, s, __ATOMIC_RELAXED);
}

uint64_t mer_q_memread(const uint8_t *p, int64_t n, int n_threads) {
    rd_job j = {p, n < 0 ? 0 : n, mer_q_isa(), 0};
    int64_t lines = (j.n + 63) / 64;
    pool_run(rd_worker, &j, lines, CHUNK_BYTES / 64, threads_for(n_threads, j.n, j.n));
    return j.sum;
}
