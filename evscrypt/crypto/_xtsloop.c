/*
 * The sector loop of the fast XTS path, in C.
 *
 * evp.py keys one OpenSSL EVP context per thread; this loop then, for each
 * sector, resets the IV (the sector's tweak) and runs one EVP_CipherUpdate,
 * with the GIL released for the whole request (except for short ones, see
 * GIL_KEEP_SECTORS).  It takes the two OpenSSL functions as addresses that
 * ctypes resolved from the same libcrypto, so it needs neither OpenSSL
 * headers nor linking against it.  The loop itself, with the tweak and the
 * zero-unwritten skip, is _xtssector.h, shared with _xtsvaes.c.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#include "_xtssector.h"

typedef int (*init_fn)(void *ctx, const void *cipher, void *engine,
                       const unsigned char *key, const unsigned char *iv, int enc);
typedef int (*update_fn)(void *ctx, unsigned char *out, int *outl,
                         const unsigned char *in, int inl);

struct evp {
    void *ctx;
    init_fn init;
    update_fn update;
    int enc;
};

/* One sector: the tweak as the IV, then one update (a sector_fn). */
static int
evp_sector(void *arg, const unsigned char *tweak16, const unsigned char *in, unsigned char *out, Py_ssize_t len)
{
    const struct evp *e = arg;
    int outl = 0;
    return e->init(e->ctx, NULL, NULL, NULL, tweak16, e->enc) == 1 &&
           e->update(e->ctx, out, &outl, in, (int)len) == 1 && outl == len;
}

static PyObject *
crypt_sectors(PyObject *self, PyObject *args)
{
    unsigned long long ctx, init_addr, update_addr, first, iv_mul;
    Py_buffer src, dst;
    int sector, enc, skip_zero = 0;

    if (!PyArg_ParseTuple(args, "KKKKKy*w*ii|p", &ctx, &init_addr, &update_addr, &first, &iv_mul,
                          &src, &dst, &sector, &enc, &skip_zero))
        return NULL;
    if (!whole_sectors(&src, &dst, sector, 8)) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        return NULL;
    }
    struct evp e = {(void *)(uintptr_t)ctx, (init_fn)(uintptr_t)init_addr, (update_fn)(uintptr_t)update_addr, enc};
    Py_ssize_t n = src.len / sector;

    PyThreadState *ts = n > GIL_KEEP_SECTORS ? PyEval_SaveThread() : NULL;
    int ok = run_sectors(evp_sector, &e, first, iv_mul, src.buf, dst.buf, n, sector, skip_zero);
    if (ts)
        PyEval_RestoreThread(ts);

    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (!ok) {
        PyErr_SetString(PyExc_OSError, "EVP XTS operation failed");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"crypt_sectors", crypt_sectors, METH_VARARGS,
     "crypt_sectors(ctx, init, update, first_sector, iv_per_sector, src, dst, sector_size, enc,\n"
     "              skip_zero=False)\n\n"
     "With skip_zero, all-zero sectors of src are not run through the cipher: they come out as zeros."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_xtsloop", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__xtsloop(void)
{
    return PyModule_Create(&module);
}
