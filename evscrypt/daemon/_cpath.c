/*
 * The C data path: aligned reads and writes of encrypted disks, answered in
 * the FUSE worker threads without the GIL.
 *
 * pyfuse3's worker threads (patches/pyfuse3-3.5.0-cfilter.patch) show every
 * request they receive to FILTER before libfuse parses it.  A READ or WRITE
 * of a registered inode (cpath.py registers a volume at attach) that is
 * sector aligned, no larger than MAX_IO and inside the disk is done here:
 * pread + XTS + one write of the reply to the FUSE device, or XTS + pwrite +
 * reply.  Everything else returns 0 and goes to Python as before, and so
 * does a request that fails here (a short write, an I/O error): Python runs
 * it again and owns every error rule (errno, failing the volume).  So one
 * process serves small I/O on as many cores as it has worker threads.
 *
 * The format's facts are not restated: the sector size, the IV units per
 * sector, the data offset and the zero-unwritten rule arrive as parameters
 * at register (from format.py via cpath.py), the sector loop and its tweak
 * are _xtssector.h's, and the cipher is _xtsvaes's crypt_run, handed over
 * in a capsule.  The key schedule is read in place, in the locked Secret
 * that VaesXts owns (a buffer held from register to unregister); nothing
 * here copies key material, and crypt_run clears the vector registers.
 *
 * A volume in a Ceph RBD pool has no fd: its requests go to librbd's
 * asynchronous I/O instead, and its completion thread decrypts and replies
 * (_cpath_rbd.c).  The shared types are in _cpath.h.
 *
 * Locks (docs/CONCURRENCY.md):
 *  - slot.mu guards one slot: its fields, its counts and counters.  Held
 *    only to enter and leave a request, never during I/O.
 *  - slot.drained (with mu): unregister and hold_writes wait on it for the
 *    requests (or writes) in flight to finish.
 *  - SectorLocks: striped sector locks (64 stripes for a file, 4096 for an
 *    RBD image), the same object the Python engine uses for its
 *    read-modify-write, so a partial write there and a whole-sector write
 *    here never interleave on one sector.  A stripe is a flag under one
 *    mutex, not a mutex of its own, because an RBD write takes its stripes
 *    in a FUSE worker and releases them in librbd's completion thread.
 */
#include "_cpath.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Registered volumes by inode number modulo SLOTS; a volume whose slot is
 * taken stays in Python. */
#define SLOTS 4096

/* ---- the sector locks, shared with the Python engine ---- */

/* Wait until none of the stripes of sectors first .. first + count - 1 is
 * taken, then take them all (at once, so no order is needed). */
void
lock_range(SectorLocks *l, uint64_t first, uint64_t count)
{
    uint64_t n = count < (uint64_t)l->stripes ? count : (uint64_t)l->stripes;
    pthread_mutex_lock(&l->mu);
    for (;;) {
        uint64_t i = 0;
        while (i < n && !l->busy[(first + i) % l->stripes])
            i++;
        if (i == n)
            break;
        l->waiters++;
        pthread_cond_wait(&l->freed, &l->mu);
        l->waiters--;
    }
    for (uint64_t i = 0; i < n; i++)
        l->busy[(first + i) % l->stripes] = 1;
    pthread_mutex_unlock(&l->mu);
}

void
unlock_range(SectorLocks *l, uint64_t first, uint64_t count)
{
    uint64_t n = count < (uint64_t)l->stripes ? count : (uint64_t)l->stripes;
    pthread_mutex_lock(&l->mu);
    for (uint64_t i = 0; i < n; i++)
        l->busy[(first + i) % l->stripes] = 0;
    if (l->waiters)
        pthread_cond_broadcast(&l->freed);
    pthread_mutex_unlock(&l->mu);
}

static PyObject *
locks_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"stripes", NULL};
    int stripes = 64;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|i", kwlist, &stripes))
        return NULL;
    if (stripes < 1 || stripes > 1 << 20) {
        PyErr_SetString(PyExc_ValueError, "stripes out of range");
        return NULL;
    }
    SectorLocks *l = (SectorLocks *)type->tp_alloc(type, 0);
    if (!l)
        return NULL;
    l->busy = calloc((size_t)stripes, 1);
    if (!l->busy) {
        Py_DECREF(l);
        return PyErr_NoMemory();
    }
    l->stripes = stripes;
    pthread_mutex_init(&l->mu, NULL);
    pthread_cond_init(&l->freed, NULL);
    return (PyObject *)l;
}

static void
locks_dealloc(SectorLocks *l)
{
    if (l->busy) {
        pthread_mutex_destroy(&l->mu);
        pthread_cond_destroy(&l->freed);
        free(l->busy);
    }
    Py_TYPE(l)->tp_free((PyObject *)l);
}

/* take(first, count, lock): lock or unlock the stripes of those sectors.
 * Locking waits without the GIL. */
static PyObject *
locks_take(SectorLocks *l, PyObject *args)
{
    unsigned long long first, count;
    int lock;
    if (!PyArg_ParseTuple(args, "KKp", &first, &count, &lock))
        return NULL;
    if (lock) {
        Py_BEGIN_ALLOW_THREADS
        lock_range(l, first, count);
        Py_END_ALLOW_THREADS
    } else {
        unlock_range(l, first, count);
    }
    Py_RETURN_NONE;
}

static PyMethodDef locks_methods[] = {
    {"take", (PyCFunction)locks_take, METH_VARARGS,
     "take(first, count, lock)\n\nWith lock, take the stripes of sectors first .. first + count - 1 (waiting\n"
     "for them all to be free); without, release them.  Any thread may release."},
    {NULL, NULL, 0, NULL},
};

PyTypeObject SectorLocksType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "evscrypt.daemon._cpath.SectorLocks",
    .tp_basicsize = sizeof(SectorLocks),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SectorLocks(stripes=64): striped sector locks, shared by the Python engine and the C data path.",
    .tp_new = locks_new,
    .tp_dealloc = (destructor)locks_dealloc,
    .tp_methods = locks_methods,
};

/* ---- the registry ---- */

static struct slot slots[SLOTS];
xts_run_fn crypt_run;
static pthread_key_t buf_key;

/* This thread's buffer: a reply header and up to MAX_IO of data.  Holds
 * plaintext of a read or ciphertext of a write until the next request. */
static unsigned char *
thread_buf(void)
{
    unsigned char *b = pthread_getspecific(buf_key);
    if (b == NULL) {
        if (posix_memalign((void **)&b, 64, OUT_HDR + MAX_IO) != 0)
            return NULL;
        pthread_setspecific(buf_key, b);
    }
    return b;
}

/* Count a request in if the volume is registered and serving, the range is
 * aligned, small and inside the disk (and for a write, the gate is open). */
static int
enter(uint64_t inode, uint64_t off, uint32_t size, int write, struct vol *v)
{
    struct slot *s = &slots[inode % SLOTS];
    int ok = 0;
    pthread_mutex_lock(&s->mu);
    if (s->inode == inode && s->serving && !(write && s->writes_held) && size > 0 && size <= MAX_IO &&
        off % s->sector == 0 && size % s->sector == 0 && off <= s->size && size <= s->size - off) {
        s->inflight++;
        s->writers += write;
        *v = (struct vol){s,         s->fd,          s->rbd,   s->on_error,      s->data_offset, s->iv_per_sector,
                          s->sector, s->zero_unwritten, s->sched, s->locks};
        ok = 1;
    }
    pthread_mutex_unlock(&s->mu);
    return ok;
}

void
leave(struct vol *v, int write, uint64_t bytes, int done)
{
    struct slot *s = v->s;
    pthread_mutex_lock(&s->mu);
    s->inflight--;
    s->writers -= write;
    if (done) {
        if (write) {
            s->writes++;
            s->bytes_written += bytes;
        } else {
            s->reads++;
            s->bytes_read += bytes;
        }
    }
    if (s->inflight == 0 || (write && s->writers == 0))
        pthread_cond_broadcast(&s->drained);
    pthread_mutex_unlock(&s->mu);
}

/* Send a reply (header + n bytes already in place after it); a reply the
 * kernel no longer wants (ENOENT: the request was interrupted) is fine. */
void
reply(int fd, uint64_t unique, unsigned char *buf, size_t n)
{
    struct fuse_out_header *oh = (struct fuse_out_header *)buf;
    oh->len = (uint32_t)(OUT_HDR + n);
    oh->error = 0;
    oh->unique = unique;
    ssize_t r;
    do
        r = write(fd, buf, OUT_HDR + n);
    while (r < 0 && errno == EINTR);
}

/* Answer a request with -err and no data. */
void
reply_error(int fd, uint64_t unique, int err)
{
    struct fuse_out_header oh = {.len = (uint32_t)OUT_HDR, .error = -err, .unique = unique};
    ssize_t r;
    do
        r = write(fd, &oh, sizeof oh);
    while (r < 0 && errno == EINTR);
}

static int
do_read(int fd, const struct fuse_in_header *in, const struct fuse_read_in *rd)
{
    struct vol v;
    if (!enter(in->nodeid, rd->offset, rd->size, 0, &v))
        return 0;
    if (v.rbd)
        return rbd_read(fd, in, rd, &v);
    unsigned char *buf = thread_buf();
    unsigned char *data = buf + OUT_HDR;
    size_t got = 0;
    while (buf && got < rd->size) {
        ssize_t r = pread(v.fd, data + got, rd->size - got, (off_t)(v.data_offset + rd->offset + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            leave(&v, 0, 0, 0);
            return 0; /* Python reads it again and reports the error */
        }
        if (r == 0) { /* past the end of the image file: zeros */
            memset(data + got, 0, rd->size - got);
            break;
        }
        got += (size_t)r;
    }
    if (!buf) {
        leave(&v, 0, 0, 0);
        return 0;
    }
    crypt_run(v.sched, rd->offset / (uint64_t)v.sector, v.iv_per_sector, data, data, rd->size / v.sector, v.sector,
              0, v.zero_unwritten, 1);
    reply(fd, in->unique, buf, rd->size);
    leave(&v, 0, rd->size, 1);
    return 1;
}

static int
do_write(int fd, const struct fuse_in_header *in, const struct fuse_write_in *wr, size_t len)
{
    struct vol v;
    if (len != sizeof *in + sizeof *wr + wr->size || !enter(in->nodeid, wr->offset, wr->size, 1, &v))
        return 0;
    if (v.rbd)
        return rbd_write(fd, in, wr, &v);
    unsigned char *buf = thread_buf();
    if (!buf) {
        leave(&v, 1, 0, 0);
        return 0;
    }
    unsigned char *data = buf + OUT_HDR;
    uint64_t first = wr->offset / (uint64_t)v.sector, count = wr->size / v.sector;
    lock_range(v.locks, first, count);
    crypt_run(v.sched, first, v.iv_per_sector, (const unsigned char *)(wr + 1), data, (Py_ssize_t)count, v.sector, 1,
              0, 1);
    size_t put = 0;
    while (put < wr->size) {
        ssize_t r = pwrite(v.fd, data + put, wr->size - put, (off_t)(v.data_offset + wr->offset + put));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            unlock_range(v.locks, first, count);
            leave(&v, 1, 0, 0);
            return 0; /* Python writes it again and reports the error */
        }
        put += (size_t)r;
    }
    unlock_range(v.locks, first, count);
    struct fuse_write_out *out = (struct fuse_write_out *)data;
    out->size = wr->size;
    out->padding = 0;
    reply(fd, in->unique, buf, sizeof *out);
    leave(&v, 1, wr->size, 1);
    return 1;
}

/* The request filter (pyfuse3.set_request_filter): 1 if answered here. */
static int
filter(int fd, const void *req, size_t len)
{
    const struct fuse_in_header *in = req;
    if (len < sizeof *in)
        return 0;
    if (in->opcode == FUSE_READ && len >= sizeof *in + sizeof(struct fuse_read_in))
        return do_read(fd, in, (const struct fuse_read_in *)(in + 1));
    if (in->opcode == FUSE_WRITE && len >= sizeof *in + sizeof(struct fuse_write_in))
        return do_write(fd, in, (const struct fuse_write_in *)(in + 1), len);
    return 0;
}

/* ---- the Python interface (cpath.py) ---- */

static struct slot *
slot_of(unsigned long long inode)
{
    if (inode == 0) {
        PyErr_SetString(PyExc_ValueError, "inode 0");
        return NULL;
    }
    return &slots[inode % SLOTS];
}

/* Wait on s->drained until done(s), without the GIL; s->mu is held. */
#define WAIT_DRAINED(s, cond)                                                 \
    do {                                                                      \
        Py_BEGIN_ALLOW_THREADS                                                \
        while (!(cond))                                                       \
            pthread_cond_wait(&(s)->drained, &(s)->mu);                       \
        Py_END_ALLOW_THREADS                                                  \
    } while (0)

static PyObject *
py_register(PyObject *self, PyObject *args)
{
    unsigned long long inode, rbd, data_offset, size, iv_per_sector;
    Py_ssize_t sector;
    int fd, zero_unwritten;
    PyObject *sched, *locks, *on_error;
    if (!PyArg_ParseTuple(args, "KiKKKnKpOO!O", &inode, &fd, &rbd, &data_offset, &size, &sector, &iv_per_sector,
                          &zero_unwritten, &sched, &SectorLocksType, &locks, &on_error))
        return NULL;
    if ((fd < 0) == (rbd == 0) || (rbd && !PyCallable_Check(on_error))) {
        PyErr_SetString(PyExc_ValueError, "a volume has an fd or an RBD image (with on_error), not both");
        return NULL;
    }
    struct slot *s = slot_of(inode);
    if (!s)
        return NULL;
    if (crypt_run == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "no XTS implementation installed");
        return NULL;
    }
    if (sector <= 0 || sector % 16 || MAX_IO % sector) {
        PyErr_SetString(PyExc_ValueError, "bad sector size");
        return NULL;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(sched, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    pthread_mutex_lock(&s->mu);
    if (s->inode != 0) {
        pthread_mutex_unlock(&s->mu);
        PyBuffer_Release(&b);
        Py_RETURN_FALSE; /* the slot is taken: this volume stays in Python */
    }
    Py_INCREF(locks);
    Py_INCREF(on_error);
    s->inode = inode;
    s->fd = fd;
    s->rbd = (void *)(uintptr_t)rbd;
    s->on_error = on_error;
    s->data_offset = data_offset;
    s->size = size;
    s->sector = sector;
    s->iv_per_sector = iv_per_sector;
    s->zero_unwritten = zero_unwritten;
    s->sched_buf = b;
    s->sched = b.buf;
    s->locks = (SectorLocks *)locks;
    s->reads = s->writes = s->bytes_read = s->bytes_written = 0;
    s->writes_held = 0;
    s->serving = 1;
    pthread_mutex_unlock(&s->mu);
    Py_RETURN_TRUE;
}

static PyObject *
counters_of(struct slot *s)
{
    return Py_BuildValue("(KKKK)", (unsigned long long)s->reads, (unsigned long long)s->writes,
                         (unsigned long long)s->bytes_read, (unsigned long long)s->bytes_written);
}

static PyObject *
py_unregister(PyObject *self, PyObject *args)
{
    unsigned long long inode;
    if (!PyArg_ParseTuple(args, "K", &inode))
        return NULL;
    struct slot *s = slot_of(inode);
    if (!s)
        return NULL;
    pthread_mutex_lock(&s->mu);
    if (s->inode != inode) {
        pthread_mutex_unlock(&s->mu);
        Py_RETURN_NONE;
    }
    s->serving = 0;
    WAIT_DRAINED(s, s->inflight == 0);
    PyObject *counts = counters_of(s);
    SectorLocks *locks = s->locks;
    PyObject *on_error = s->on_error;
    Py_buffer b = s->sched_buf;
    s->inode = 0;
    s->sched = NULL;
    s->locks = NULL;
    s->on_error = NULL;
    s->fd = -1;
    s->rbd = NULL;
    memset(&s->sched_buf, 0, sizeof s->sched_buf);
    pthread_mutex_unlock(&s->mu);
    PyBuffer_Release(&b);
    Py_DECREF(locks);
    Py_DECREF(on_error);
    return counts;
}

/* control(inode, what, value=0): change or read a registered volume's slot
 * (nothing happens for an inode not registered).
 *   "size"     the disk's size is now value (after a resize)
 *   "disable"  send its requests to Python from now on (the volume failed)
 *   "hold"     value 1: send its writes to Python and wait for those running
 *              here (a snapshot closes the write gate); value 0: take them again
 *   "counters" (reads, writes, bytes_read, bytes_written) served here */
static PyObject *
py_control(PyObject *self, PyObject *args)
{
    unsigned long long inode, value = 0;
    const char *what;
    if (!PyArg_ParseTuple(args, "Ks|K", &inode, &what, &value))
        return NULL;
    int size = !strcmp(what, "size"), disable = !strcmp(what, "disable"), hold = !strcmp(what, "hold"),
        counters = !strcmp(what, "counters");
    if (!(size || disable || hold || counters))
        return PyErr_Format(PyExc_ValueError, "unknown control %s", what);
    struct slot *s = &slots[inode % SLOTS];
    PyObject *ret = NULL;
    pthread_mutex_lock(&s->mu);
    if (inode == 0 || s->inode != inode) {
        pthread_mutex_unlock(&s->mu);
        return counters ? Py_BuildValue("(KKKK)", 0ULL, 0ULL, 0ULL, 0ULL) : Py_NewRef(Py_None);
    }
    if (size)
        s->size = value;
    else if (disable)
        s->serving = 0;
    else if (hold) {
        s->writes_held = value != 0;
        if (value)
            WAIT_DRAINED(s, s->writers == 0);
    } else
        ret = counters_of(s);
    pthread_mutex_unlock(&s->mu);
    return ret ? ret : Py_NewRef(Py_None);
}

static PyObject *
py_install(PyObject *self, PyObject *args)
{
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "O", &cap))
        return NULL;
    xts_run_fn fn = (xts_run_fn)PyCapsule_GetPointer(cap, XTS_RUN_CAPSULE);
    if (!fn)
        return NULL;
    crypt_run = fn;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"install", py_install, METH_VARARGS, "install(crypt_run_capsule)\n\nThe XTS implementation (_xtsvaes.CRYPT_RUN)."},
    {"register", py_register, METH_VARARGS,
     "register(inode, fd, rbd, data_offset, size, sector_size, iv_per_sector, zero_unwritten, sched, locks,\n"
     "         on_error) -> bool\n\n"
     "Serve aligned reads and writes of inode here; False if its slot is taken (it stays in Python).\n"
     "The image is the file fd (rbd 0), or the librbd image rbd (fd -1; from rbd_handle), whose failed\n"
     "requests call on_error(errno, 'read' or 'write') from librbd's thread.\n"
     "sched (the key schedule) is held until unregister."},
    {"rbd_handle", py_rbd_handle, METH_VARARGS,
     "rbd_handle(image, ioctx) -> (handle, size) or None\n\n"
     "librbd's handle of the python-rbd Image image, opened on ioctx, and the size librbd gives for it;\n"
     "None where this python-rbd\n"
     "does not keep it as _cpath_rbd.c expects (its volumes then stay in Python)."},
    {"unregister", py_unregister, METH_VARARGS,
     "unregister(inode) -> (reads, writes, bytes_read, bytes_written) or None\n\n"
     "Stop serving inode, wait for its requests in flight, release the schedule."},
    {"control", py_control, METH_VARARGS,
     "control(inode, what, value=0)\n\n"
     "what: 'size' (now value), 'disable', 'hold' (value 1: send writes to Python and wait for those\n"
     "running here; 0: take them again), 'counters' -> (reads, writes, bytes_read, bytes_written)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_cpath",
    .m_doc = "The C data path: aligned reads and writes of registered volumes, answered in the FUSE "
             "worker threads without the GIL (see evscrypt/daemon/cpath.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__cpath(void)
{
    if (PyType_Ready(&SectorLocksType) < 0)
        return NULL;
    if (pthread_key_create(&buf_key, free) != 0)
        return PyErr_NoMemory();
    for (int i = 0; i < SLOTS; i++) {
        pthread_mutex_init(&slots[i].mu, NULL);
        pthread_cond_init(&slots[i].drained, NULL);
        slots[i].fd = -1;
    }
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&SectorLocksType);
    if (PyModule_AddObject(m, "SectorLocks", (PyObject *)&SectorLocksType) < 0 ||
        PyModule_AddObject(m, "FILTER", PyCapsule_New((void *)filter, "pyfuse3.request_filter", NULL)) < 0 ||
        PyModule_AddIntConstant(m, "MAX_IO", MAX_IO) < 0 || PyModule_AddIntConstant(m, "SLOTS", SLOTS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
