#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "stackdist.h"

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
