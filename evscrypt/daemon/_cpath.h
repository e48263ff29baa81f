/*
 * What the two halves of the C data path share: _cpath.c (the registry, the
 * request filter, files) and _cpath_rbd.c (volumes in a Ceph RBD pool).
 */
#ifndef EVSCRYPT_CPATH_H
#define EVSCRYPT_CPATH_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdint.h>

#include "../crypto/_xtssector.h"

/* The largest request done here: the kernel's default max_read/max_write.
 * Larger ones go to Python, which runs them in the I/O pool. */
#define MAX_IO (128 * 1024)
#define OUT_HDR ((Py_ssize_t)sizeof(struct fuse_out_header))

/* Striped sector locks: a stripe is a flag under one mutex, so a thread
 * other than the one that took it may release it. */
typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t freed;
    int stripes, waiters;
    unsigned char *busy;
} SectorLocks;

void lock_range(SectorLocks *l, uint64_t first, uint64_t count);
void unlock_range(SectorLocks *l, uint64_t first, uint64_t count);

struct slot {
    pthread_mutex_t mu;
    pthread_cond_t drained;
    uint64_t inode; /* 0: free */
    int serving;    /* 0 while draining for unregister, or disabled */
    int writes_held;
    long inflight, writers;
    /* the volume, set at register */
    int fd;    /* the image file, or -1 */
    void *rbd; /* or librbd's rbd_image_t */
    PyObject *on_error; /* with rbd: called (with the GIL) when librbd fails a request */
    uint64_t data_offset, size, iv_per_sector;
    Py_ssize_t sector;
    int zero_unwritten;
    const unsigned char *sched;
    Py_buffer sched_buf;
    SectorLocks *locks;
    /* what status reports, besides Python's counters */
    uint64_t reads, writes, bytes_read, bytes_written;
} __attribute__((aligned(64))); /* no cache line shared by two volumes' slots */

/* What a request may use of its volume, copied out under the slot lock;
 * valid until leave() (unregister waits for that). */
struct vol {
    struct slot *s;
    int fd;
    void *rbd;
    PyObject *on_error;
    uint64_t data_offset, iv_per_sector;
    Py_ssize_t sector;
    int zero_unwritten;
    const unsigned char *sched;
    SectorLocks *locks;
};

extern xts_run_fn crypt_run;

void leave(struct vol *v, int write, uint64_t bytes, int done);
void reply(int fd, uint64_t unique, unsigned char *buf, size_t n);
void reply_error(int fd, uint64_t unique, int err);

/* _cpath_rbd.c */
int rbd_read(int fuse_fd, const struct fuse_in_header *in, const struct fuse_read_in *rd, struct vol *v);
int rbd_write(int fuse_fd, const struct fuse_in_header *in, const struct fuse_write_in *wr, struct vol *v);
PyObject *py_rbd_handle(PyObject *self, PyObject *args);

#endif /* EVSCRYPT_CPATH_H */
