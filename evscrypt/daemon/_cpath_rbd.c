/*
 * The C data path for a volume in a Ceph RBD pool.
 *
 * A FUSE worker hands an aligned READ or WRITE to librbd's asynchronous
 * I/O and goes back to the device at once; librbd's completion thread then
 * decrypts (a read) and writes the reply to the FUSE device.  So many
 * requests are in flight in the cluster at once, and no Python runs per
 * request: through python-rbd, each completion took the GIL in librbd's
 * thread, which cost more CPU than the request itself (docs/PERFORMANCE.md,
 * "RBD").
 *
 * librbd is the one python-rbd has loaded (dlopen with RTLD_NOLOAD: the same
 * library, the same image, the same exclusive lock), and the image is the
 * one the store opened and locked.  python-rbd does not give its handle
 * out, so py_rbd_handle reads it from the Image object, where python-rbd's
 * Cython class keeps it: the fields `rbd_image_t image; bint closed;
 * object name; object ioctx` in that order.  The ioctx field is found by
 * its value (the Ioctx the image was opened on), the others are checked
 * (closed is 0, name is a str or bytes, librbd answers for the handle with
 * the image's size), and anything else means None: the volume then stays in
 * Python, which works with any python-rbd.
 *
 * Errors: a request librbd fails cannot go back to Python, as a file's
 * does (it is already answered for), so it is answered EIO here, the slot
 * stops serving (later requests go to Python, which answers EIO for a
 * failed volume), and on_error(errno, verb) runs with the GIL so that
 * Python fails the volume by its own rules.
 */
#include "_cpath.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

typedef void *rbd_image_t;
typedef void *rbd_completion_t;
typedef void (*rbd_callback_t)(rbd_completion_t cb, void *arg);

/* librbd's C API (librbd.h), the few calls used */
static struct {
    int (*create)(void *arg, rbd_callback_t cb, rbd_completion_t *c);
    int (*read)(rbd_image_t image, uint64_t off, size_t len, char *buf, rbd_completion_t c);
    int (*write)(rbd_image_t image, uint64_t off, size_t len, const char *buf, rbd_completion_t c);
    ssize_t (*ret)(rbd_completion_t c);
    void (*release)(rbd_completion_t c);
    int (*get_size)(rbd_image_t image, uint64_t *size);
} lib;

/* Bind to the librbd already loaded (by python-rbd); 0, or -1 if it is not. */
static int
bind_librbd(void)
{
    if (lib.get_size)
        return 0;
    void *h = dlopen("librbd.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (!h)
        return -1;
    void *create = dlsym(h, "rbd_aio_create_completion"), *read = dlsym(h, "rbd_aio_read"),
         *write = dlsym(h, "rbd_aio_write"), *ret = dlsym(h, "rbd_aio_get_return_value"),
         *release = dlsym(h, "rbd_aio_release"), *get_size = dlsym(h, "rbd_get_size");
    if (!(create && read && write && ret && release && get_size))
        return -1;
    lib.create = create;
    lib.read = read;
    lib.write = write;
    lib.ret = ret;
    lib.release = release;
    lib.get_size = get_size; /* last: bind_librbd is done once this is set */
    return 0;
}

/* One request in flight in librbd. */
struct aio {
    struct vol v;
    int fuse_fd, write;
    uint64_t unique, first, count;
    uint32_t size;
    rbd_completion_t c;
    unsigned char buf[]; /* the reply header, then the data */
};

static void
failed(struct aio *a, int err)
{
    reply_error(a->fuse_fd, a->unique, EIO);
    pthread_mutex_lock(&a->v.s->mu);
    a->v.s->serving = 0;
    pthread_mutex_unlock(&a->v.s->mu);
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *r = PyObject_CallFunction(a->v.on_error, "is", err, a->write ? "write" : "read");
    if (r)
        Py_DECREF(r);
    else
        PyErr_WriteUnraisable(a->v.on_error);
    PyGILState_Release(g);
    leave(&a->v, a->write, 0, 0);
    free(a);
}

/* librbd's completion thread */
static void
completed(rbd_completion_t c, void *arg)
{
    struct aio *a = arg;
    ssize_t r = lib.ret(c);
    lib.release(c);
    unsigned char *data = a->buf + OUT_HDR;
    if (!a->write) {
        if (r != (ssize_t)a->size) {
            failed(a, r < 0 ? (int)-r : EIO);
            return;
        }
        crypt_run(a->v.sched, a->first, a->v.iv_per_sector, data, data, (Py_ssize_t)a->count, a->v.sector, 0,
                  a->v.zero_unwritten, 1);
        reply(a->fuse_fd, a->unique, a->buf, a->size);
        leave(&a->v, 0, a->size, 1);
    } else {
        unlock_range(a->v.locks, a->first, a->count);
        if (r < 0) {
            failed(a, (int)-r);
            return;
        }
        struct fuse_write_out *out = (struct fuse_write_out *)data;
        out->size = a->size;
        out->padding = 0;
        reply(a->fuse_fd, a->unique, a->buf, sizeof *out);
        leave(&a->v, 1, a->size, 1);
    }
    free(a);
}

static struct aio *
new_aio(int fuse_fd, uint64_t unique, uint64_t off, uint32_t size, int write, struct vol *v)
{
    struct aio *a = malloc(sizeof *a + OUT_HDR + size);
    if (!a)
        return NULL;
    *a = (struct aio){.v = *v,
                      .fuse_fd = fuse_fd,
                      .write = write,
                      .unique = unique,
                      .first = off / (uint64_t)v->sector,
                      .count = size / (uint64_t)v->sector,
                      .size = size};
    if (lib.create(a, completed, &a->c) < 0) {
        free(a);
        return NULL;
    }
    return a;
}

/* After a refused submit: nothing was sent, Python does the request. */
static int
not_sent(struct aio *a, struct vol *v, int write)
{
    if (a) {
        lib.release(a->c);
        free(a);
    }
    leave(v, write, 0, 0);
    return 0;
}

int
rbd_read(int fuse_fd, const struct fuse_in_header *in, const struct fuse_read_in *rd, struct vol *v)
{
    struct aio *a = new_aio(fuse_fd, in->unique, rd->offset, rd->size, 0, v);
    if (!a || lib.read(v->rbd, v->data_offset + rd->offset, rd->size, (char *)a->buf + OUT_HDR, a->c) < 0)
        return not_sent(a, v, 0);
    return 1;
}

int
rbd_write(int fuse_fd, const struct fuse_in_header *in, const struct fuse_write_in *wr, struct vol *v)
{
    struct aio *a = new_aio(fuse_fd, in->unique, wr->offset, wr->size, 1, v);
    if (!a)
        return not_sent(a, v, 1);
    lock_range(v->locks, a->first, a->count);
    crypt_run(v->sched, a->first, v->iv_per_sector, (const unsigned char *)(wr + 1), a->buf + OUT_HDR,
              (Py_ssize_t)a->count, v->sector, 1, 0, 1);
    if (lib.write(v->rbd, v->data_offset + wr->offset, wr->size, (const char *)a->buf + OUT_HDR, a->c) < 0) {
        unlock_range(v->locks, a->first, a->count);
        return not_sent(a, v, 1);
    }
    return 1;
}

PyObject *
py_rbd_handle(PyObject *self, PyObject *args)
{
    PyObject *image, *ioctx;
    if (!PyArg_ParseTuple(args, "OO", &image, &ioctx))
        return NULL;
    if (bind_librbd() < 0)
        Py_RETURN_NONE;
    void **w = (void **)((char *)image + sizeof(PyObject));
    Py_ssize_t words = (Py_TYPE(image)->tp_basicsize - (Py_ssize_t)sizeof(PyObject)) / (Py_ssize_t)sizeof(void *);
    Py_ssize_t at = -1;
    for (Py_ssize_t i = 0; i < words; i++)
        if (w[i] == (void *)ioctx) {
            if (at >= 0)
                Py_RETURN_NONE; /* twice: not the layout expected */
            at = i;
        }
    if (at < 3 || w[at - 2] != NULL || w[at - 3] == NULL)
        Py_RETURN_NONE; /* closed must be 0 (with its padding), the handle set */
    PyObject *name = w[at - 1];
    if (!name || !(PyBytes_CheckExact(name) || PyUnicode_CheckExact(name)))
        Py_RETURN_NONE;
    uint64_t size;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = lib.get_size(w[at - 3], &size);
    Py_END_ALLOW_THREADS
    if (r < 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(KK)", (unsigned long long)(uintptr_t)w[at - 3], (unsigned long long)size);
}
