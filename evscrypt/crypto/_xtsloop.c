/*
 * The sector loop of the fast XTS path, in C.
 *
 * evp.py keys one OpenSSL EVP context per thread; this loop then, for each
 * 4 KiB sector, resets the IV (the dm-crypt plain64 tweak) and runs one
 * EVP_CipherUpdate, with the GIL released for the whole request (except
 * for short ones, see GIL_KEEP_SECTORS).  It takes
 * the two OpenSSL functions as addresses that ctypes resolved from the same
 * libcrypto, so it needs neither OpenSSL headers nor linking against it.
 * The tweak arithmetic mirrors evscrypt.crypto.xts.tweak(), the one
 * documented place for it: tweak = (first_sector + i) * iv_per_sector as a
 * 16-byte little-endian integer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* Requests of at most this many sectors run with the GIL held. */
#define GIL_KEEP_SECTORS 4

typedef int (*init_fn)(void *ctx, const void *cipher, void *engine,
                       const unsigned char *key, const unsigned char *iv, int enc);
typedef int (*update_fn)(void *ctx, unsigned char *out, int *outl,
                         const unsigned char *in, int inl);

/* True if the sector holds only zero bytes (sector is a multiple of 8). */
static int
all_zero(const unsigned char *p, int sector)
{
    const unsigned long long *w = (const unsigned long long *)p;
    for (int k = 0; k < sector / 8; k++)
        if (w[k])
            return 0;
    return 1;
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
    if (sector <= 0 || sector % 8 || src.len % sector || dst.len < src.len) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "buffers must hold whole sectors");
        return NULL;
    }
    init_fn init = (init_fn)(uintptr_t)init_addr;
    update_fn update = (update_fn)(uintptr_t)update_addr;
    Py_ssize_t n = src.len / sector;
    int failed = 0;
    const unsigned char *in = src.buf;
    unsigned char *out = dst.buf;

    /* Releasing the GIL costs a hand-over to another thread and back, more
     * than a few sectors of AES: keep it for short requests. */
    PyThreadState *ts = n > GIL_KEEP_SECTORS ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t i = 0; i < n && !failed; i++) {
        if (skip_zero && all_zero(in + i * sector, sector)) {
            /* the caller's convention: an all-zero sector stays zeros */
            if (out + i * sector != in + i * sector)
                memset(out + i * sector, 0, sector);
            continue;
        }
        unsigned __int128 t = ((unsigned __int128)first + (unsigned __int128)i) * iv_mul;
        unsigned char iv[16];
        for (int b = 0; b < 16; b++) {
            iv[b] = (unsigned char)(t & 0xff);
            t >>= 8;
        }
        int outl = 0;
        if (init((void *)(uintptr_t)ctx, NULL, NULL, NULL, iv, enc) != 1 ||
            update((void *)(uintptr_t)ctx, out + i * sector, &outl, in + i * sector, sector) != 1 ||
            outl != sector)
            failed = 1;
    }
    if (ts)
        PyEval_RestoreThread(ts);

    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (failed) {
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
