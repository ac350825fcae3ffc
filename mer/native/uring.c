#include <linux/io_uring.h>
#include <sys/syscall.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "uring.h"

#ifndef IORING_SETUP_COOP_TASKRUN
#define IORING_SETUP_COOP_TASKRUN (1U << 8)
#endif
#ifndef IORING_SETUP_TASKRUN_FLAG
#define IORING_SETUP_TASKRUN_FLAG (1U << 9)
#endif
#ifndef IORING_SQ_TASKRUN
#define IORING_SQ_TASKRUN (1U << 1)
#endif

typedef struct mer_ring mer_ring;

struct mer_ring {
    int fd;
    unsigned setup_flags;
    unsigned features;
    unsigned sq_entries, cq_entries;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_flags, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_map; size_t sq_map_len;
    void *cq_map; size_t cq_map_len;
    void *sqe_map; size_t sqe_map_len;
    unsigned sqe_tail;   /* SQEs prepared locally (published at enter) */
    unsigned sqe_head;   /* SQEs handed to the kernel */
};

static int sys_setup(unsigned entries, struct io_uring_params *p) {
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static int sys_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
    return (int)syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, NULL, 0);
}

static int sys_register(int fd, unsigned op, void *arg, unsigned nr) {
    return (int)syscall(__NR_io_uring_register, fd, op, arg, nr);
}

static void unmap_all(struct mer_ring *r) {
    if (r->sqe_map && r->sqe_map != MAP_FAILED) munmap(r->sqe_map, r->sqe_map_len);
    if (r->cq_map && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_map_len);
    if (r->sq_map && r->sq_map != MAP_FAILED) munmap(r->sq_map, r->sq_map_len);
    r->sq_map = r->cq_map = r->sqe_map = NULL;
}

/* Returns 0 or -errno. flags are IORING_SETUP_* (retried without them on EINVAL). */
int mer_ring_init(struct mer_ring **out, unsigned entries, unsigned flags) {
    struct io_uring_params p;
    struct mer_ring *r = calloc(1, sizeof(*r));
    int fd;
    *out = NULL;
    if (!r) return -ENOMEM;
    memset(&p, 0, sizeof(p));
    p.flags = flags;
    fd = sys_setup(entries, &p);
    if (fd < 0 && errno == EINVAL && flags) {
        memset(&p, 0, sizeof(p));
        fd = sys_setup(entries, &p);
    }
    if (fd < 0) { int e = errno; free(r); return -e; }
    r->fd = fd;
    r->setup_flags = p.flags;
    r->features = p.features;
    r->sq_entries = p.sq_entries;
    r->cq_entries = p.cq_entries;

    r->sq_map_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_map_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_map_len > r->sq_map_len) r->sq_map_len = r->cq_map_len;
        r->cq_map_len = r->sq_map_len;
    }
    r->sq_map = mmap(NULL, r->sq_map_len, PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED) goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        r->cq_map = r->sq_map;
    } else {
        r->cq_map = mmap(NULL, r->cq_map_len, PROT_READ | PROT_WRITE,
                         MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_CQ_RING);
        if (r->cq_map == MAP_FAILED) goto fail;
    }
    r->sqe_map_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqe_map = mmap(NULL, r->sqe_map_len, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQES);
    if (r->sqe_map == MAP_FAILED) goto fail;

    r->sq_head = (unsigned *)((char *)r->sq_map + p.sq_off.head);
    r->sq_tail = (unsigned *)((char *)r->sq_map + p.sq_off.tail);
    r->sq_mask = (unsigned *)((char *)r->sq_map + p.sq_off.ring_mask);
    r->sq_flags = (unsigned *)((char *)r->sq_map + p.sq_off.flags);
    r->sq_array = (unsigned *)((char *)r->sq_map + p.sq_off.array);
    r->cq_head = (unsigned *)((char *)r->cq_map + p.cq_off.head);
    r->cq_tail = (unsigned *)((char *)r->cq_map + p.cq_off.tail);
    r->cq_mask = (unsigned *)((char *)r->cq_map + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)((char *)r->cq_map + p.cq_off.cqes);
    r->sqes = (struct io_uring_sqe *)r->sqe_map;
    r->sqe_tail = r->sqe_head = *r->sq_tail;
    *out = r;
    return 0;
fail:
    {
        int e = errno;
        unmap_all(r);
        close(fd);
        free(r);
        return -e;
    }
}

void mer_ring_free(struct mer_ring *r) {
    if (!r) return;
    unmap_all(r);
    close(r->fd);
    free(r);
}

unsigned mer_ring_sq_entries(struct mer_ring *r) { return r->sq_entries; }
unsigned mer_ring_cq_entries(struct mer_ring *r) { return r->cq_entries; }
unsigned mer_ring_features(struct mer_ring *r) { return r->features; }
unsigned mer_ring_setup_flags(struct mer_ring *r) { return r->setup_flags; }

/* Free SQ slots: the kernel advances sq_head as it consumes entries. */
unsigned mer_ring_sq_space(struct mer_ring *r) {
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    return r->sq_entries - (r->sqe_tail - head);
}

unsigned mer_ring_unsubmitted(struct mer_ring *r) { return r->sqe_tail - r->sqe_head; }

int mer_ring_taskrun_pending(struct mer_ring *r) {
    return (__atomic_load_n(r->sq_flags, __ATOMIC_RELAXED) & IORING_SQ_TASKRUN) != 0;
}

int mer_ring_register_buffers(struct mer_ring *r, const uint64_t *addrs, const uint64_t *lens,
                              unsigned n) {
    struct iovec *iov = calloc(n ? n : 1, sizeof(struct iovec));
    int ret;
    unsigned i;
    if (!iov) return -ENOMEM;
    for (i = 0; i < n; i++) {
        iov[i].iov_base = (void *)(uintptr_t)addrs[i];
        iov[i].iov_len = (size_t)lens[i];
    }
    ret = sys_register(r->fd, IORING_REGISTER_BUFFERS, iov, n);
    if (ret < 0) ret = -errno;
    free(iov);
    return ret;
}

int mer_ring_unregister_buffers(struct mer_ring *r) {
    int ret = sys_register(r->fd, IORING_UNREGISTER_BUFFERS, NULL, 0);
    return ret < 0 ? -errno : ret;
}

/* Fill up to n READ (buf_index < 0) or READ_FIXED SQEs; returns how many fit. */
unsigned mer_ring_prep_reads(struct mer_ring *r, unsigned n, const int32_t *fds,
                             const uint64_t *offsets, const uint64_t *addrs,
                             const uint32_t *lens, const int32_t *buf_index,
                             const uint64_t *user_data) {
    unsigned space = mer_ring_sq_space(r);
    unsigned mask = *r->sq_mask;
    unsigned i;
    if (n > space) n = space;
    for (i = 0; i < n; i++) {
        unsigned idx = r->sqe_tail & mask;
        struct io_uring_sqe *sqe = &r->sqes[idx];
        memset(sqe, 0, sizeof(*sqe));
        sqe->fd = fds[i];
        sqe->off = offsets[i];
        sqe->addr = addrs[i];
        sqe->len = lens[i];
        sqe->user_data = user_data[i];
        if (buf_index && buf_index[i] >= 0) {
            sqe->opcode = IORING_OP_READ_FIXED;
            sqe->buf_index = (uint16_t)buf_index[i];
        } else {
            sqe->opcode = IORING_OP_READ;
        }
        r->sq_array[idx] = idx;
        r->sqe_tail++;
    }
    return n;
}

/* Publish prepared SQEs (release store of the tail), submit them and optionally
   wait for min_complete completions. Returns submitted count or -errno. */
int mer_ring_enter(struct mer_ring *r, unsigned min_complete, int wait) {
    unsigned to_submit = r->sqe_tail - r->sqe_head;
    unsigned flags = 0;
    int ret;
    if (to_submit) __atomic_store_n(r->sq_tail, r->sqe_tail, __ATOMIC_RELEASE);
    if (wait) flags |= IORING_ENTER_GETEVENTS;
    if (!to_submit && !wait) return 0;
    for (;;) {
        ret = sys_enter(r->fd, to_submit, wait ? min_complete : 0, flags);
        if (ret >= 0) break;
        if (errno == EINTR) {
            if (!wait) { ret = 0; break; }
            continue;
        }
        return -errno;
    }
    r->sqe_head += (unsigned)ret;
    return ret;
}

/* Copy up to max completions out; acquire on tail, release on head. */
unsigned mer_ring_reap(struct mer_ring *r, uint64_t *user_data, int32_t *res, unsigned max) {
    unsigned head = *r->cq_head;
    unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    unsigned mask = *r->cq_mask;
    unsigned n = 0;
    while (head != tail && n < max) {
        struct io_uring_cqe *cqe = &r->cqes[head & mask];
        user_data[n] = cqe->user_data;
        res[n] = cqe->res;
        n++;
        head++;
    }
    if (n) __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    return n;
}

/* 0 when a ring can be set up, else -errno (ENOSYS, EPERM, ...). */
int mer_probe_io_uring(void) {
    struct io_uring_params p;
    int fd;
    memset(&p, 0, sizeof(p));
    fd = sys_setup(2, &p);
    if (fd < 0) return -errno;
    close(fd);
    return 0;
}
