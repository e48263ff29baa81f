/*
 * The sector loop both C XTS paths share (_xtsloop.c on OpenSSL EVP,
 * _xtsvaes.c on VAES): the one C form of the format's per-sector rules.
 *
 * evscrypt/format.py states the rules; this file restates none of their
 * numbers.  The sector size and the IV units per sector arrive as
 * parameters, from the Python caller, which takes them from format.py:
 *
 *   - the tweak of sector s is s * iv_per_sector as a 16-byte little-endian
 *     integer (format.tweak: dm-crypt's plain64, counted in 512-byte units),
 *     computed in 128 bits;
 *   - with skip_unwritten, a stored sector of zero bytes is unwritten
 *     (format.ZERO_UNWRITTEN): it is not run through the cipher and comes
 *     out as zeros.
 *
 * Each path supplies only its cipher for one sector (a sector_fn).
 */
#ifndef EVSCRYPT_XTSSECTOR_H
#define EVSCRYPT_XTSSECTOR_H

#include <Python.h>
#include <string.h>

/* Requests of at most this many sectors run with the GIL held: releasing it
 * costs a hand-over to another thread and back, more than a few sectors of
 * AES. */
#define GIL_KEEP_SECTORS 4

/* One sector through the cipher, with its 16-byte tweak; 0 on failure. */
typedef int (*sector_fn)(void *ctx, const unsigned char *tweak16, const unsigned char *in,
                         unsigned char *out, Py_ssize_t len);

/* Whether src and dst hold whole sectors of `sector` bytes, a positive
 * multiple of `unit`; if not, a ValueError is set. */
static inline int
whole_sectors(const Py_buffer *src, const Py_buffer *dst, Py_ssize_t sector, Py_ssize_t unit)
{
    if (sector <= 0 || sector % unit || src->len % sector || dst->len < src->len) {
        PyErr_SetString(PyExc_ValueError, "buffers must hold whole sectors");
        return 0;
    }
    return 1;
}

/* True if the sector (len > 0 bytes) holds only zero bytes: its first byte
 * is zero and every byte equals the next.  One memcmp, which glibc runs on
 * vector registers and stops at the first difference (a stored sector that
 * was written is ciphertext: it differs at once). */
static inline int
all_zero(const unsigned char *p, Py_ssize_t len)
{
    return p[0] == 0 && memcmp(p, p + 1, len - 1) == 0;
}

/* Sectors first .. first + n - 1 of in, through fn into out; 0 as soon as
 * one fails. */
static inline int
run_sectors(sector_fn fn, void *ctx, unsigned __int128 first, unsigned long long iv_per_sector,
            const unsigned char *in, unsigned char *out, Py_ssize_t n, Py_ssize_t sector,
            int skip_unwritten)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *p = in + i * sector;
        unsigned char *q = out + i * sector;
        if (skip_unwritten && all_zero(p, sector)) {
            if (q != p)
                memset(q, 0, sector);
            continue;
        }
        unsigned __int128 t = (first + (unsigned __int128)i) * iv_per_sector;
        unsigned char tweak[16];
        for (int b = 0; b < 16; b++) {
            tweak[b] = (unsigned char)(t & 0xff);
            t >>= 8;
        }
        if (!fn(ctx, tweak, p, q, sector))
            return 0;
    }
    return 1;
}

/* A whole run of sectors through one XTS implementation, with run_sectors'
 * rules: n sectors of `sector` bytes from sector `first` of in into out
 * (in == out allowed), tweaks from iv_per_sector, enc 1 to encrypt, with
 * skip_zero the zero-unwritten rule, with clear the vector registers
 * cleared afterwards.  _xtsvaes exports its crypt_run as this, in a
 * capsule named XTS_RUN_CAPSULE, for C callers that run without the GIL
 * (evscrypt/daemon/_cpath.c); `ctx` is its key schedule. */
typedef void (*xts_run_fn)(const unsigned char *ctx, unsigned __int128 first, unsigned long long iv_per_sector,
                           const unsigned char *in, unsigned char *out, Py_ssize_t n, Py_ssize_t sector, int enc,
                           int skip_zero, int clear);
#define XTS_RUN_CAPSULE "evscrypt.crypto._xtsvaes.CRYPT_RUN"

#endif /* EVSCRYPT_XTSSECTOR_H */
