/*
 * XTS-AES-256 on VAES and AVX-512: sixteen AES blocks per loop turn.
 *
 * OpenSSL 3.0 (Debian 12's libcrypto) runs XTS on 128-bit AES-NI, about
 * 4.6 GB/s per core here; that is the whole encryption cost of a 1 MiB
 * request, and on two cores it caps encrypted I/O at about two thirds of
 * unencrypted.  CPUs from Ice Lake on run AES on four blocks per instruction
 * (VAES on 512-bit registers), and carry-less multiplication likewise
 * (VPCLMULQDQ), which computes the XTS tweaks four at a time.  This module
 * uses them when the CPU and the kernel offer them; evp.py falls back to the
 * OpenSSL loop otherwise.
 *
 * The cipher is plain XTS (IEEE 1619) over whole 16-byte blocks: no
 * ciphertext stealing, as dm-crypt sectors never need it.  The loop over
 * sectors, with their tweaks and the zero-unwritten skip, is _xtssector.h,
 * shared with _xtsloop.c (the caller refuses sector numbers whose tweak
 * would not fit).
 *
 * The expanded keys live in a buffer the caller owns (xts.py keeps it in a
 * locked, wiped Secret); this module keeps no key material of its own and
 * clears all 32 vector registers before it returns (clear_vectors).  It
 * refuses a key whose two halves are equal.  Every path is tested
 * against the NIST and IEEE vectors and the per-sector reference.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_xtssector.h"

/* Where the compiler lacks the VAES/VPCLMULQDQ/AVX-512 intrinsics (setup.py
 * probes it and then defines EVSCRYPT_NO_VAES), or off x86-64, the module
 * is a stub: it imports with BUILT and SUPPORTED false, its functions raise,
 * and backend.py chooses EVP at run time.  Building with -DEVSCRYPT_NO_VAES
 * simulates such a compiler (tests/test_build.py). */
#if defined(__x86_64__) && !defined(EVSCRYPT_NO_VAES)
#define HAVE_VAES 1
#include <immintrin.h>
#else
#define HAVE_VAES 0
#endif

/* Round keys: 15 for encryption with key 1, 15 for decryption with key 1,
 * 15 for encryption with key 2 (the tweak key). */
#define ROUNDS 14
#define SCHED_SIZE (3 * (ROUNDS + 1) * 16)
/* zmm0-31, as the register test reads them (registers_after_crypt) */
#define DUMP_SIZE (32 * 64)

#if HAVE_VAES
#define TARGET __attribute__((target("aes,sse4.1,avx2,avx512f,avx512bw,avx512vl,vaes,vpclmulqdq")))

static int
cpu_supported(void)
{
    __builtin_cpu_init();
    /* libgcc checks XCR0 too: the kernel must save the AVX-512 state */
    return __builtin_cpu_supports("aes") && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("vaes") && __builtin_cpu_supports("vpclmulqdq");
}

/* Registers may still hold tweaks and round keys: clear them, all 32.
 * VZEROALL clears only zmm0-15; the compiler keeps round keys in zmm16-31
 * as well (AVX-512 has 32 vector registers), so those are zeroed one by one
 * (an EVEX write to xmmN zeroes the whole zmmN).  The test suite reads the
 * registers right after a call (registers_after_crypt below). */
TARGET static void
clear_vectors(void)
{
    __asm__ volatile("vpxord %%xmm16, %%xmm16, %%xmm16\n\t"
                     "vpxord %%xmm17, %%xmm17, %%xmm17\n\t"
                     "vpxord %%xmm18, %%xmm18, %%xmm18\n\t"
                     "vpxord %%xmm19, %%xmm19, %%xmm19\n\t"
                     "vpxord %%xmm20, %%xmm20, %%xmm20\n\t"
                     "vpxord %%xmm21, %%xmm21, %%xmm21\n\t"
                     "vpxord %%xmm22, %%xmm22, %%xmm22\n\t"
                     "vpxord %%xmm23, %%xmm23, %%xmm23\n\t"
                     "vpxord %%xmm24, %%xmm24, %%xmm24\n\t"
                     "vpxord %%xmm25, %%xmm25, %%xmm25\n\t"
                     "vpxord %%xmm26, %%xmm26, %%xmm26\n\t"
                     "vpxord %%xmm27, %%xmm27, %%xmm27\n\t"
                     "vpxord %%xmm28, %%xmm28, %%xmm28\n\t"
                     "vpxord %%xmm29, %%xmm29, %%xmm29\n\t"
                     "vpxord %%xmm30, %%xmm30, %%xmm30\n\t"
                     "vpxord %%xmm31, %%xmm31, %%xmm31\n\t"
                     "vzeroall"
                     ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
                         "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18",
                         "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27",
                         "xmm28", "xmm29", "xmm30", "xmm31");
}

/* ---- key expansion (Intel's AES-NI white paper, AES-256) ---- */

/* Each 32-bit word of x xored with every word below it (x ^ x<<32 ^ x<<64
 * ^ x<<96): the running xor both halves of a schedule step start from. */
TARGET static inline __m128i
xor_words_below(__m128i x)
{
    __m128i t = _mm_slli_si128(x, 4);
    x = _mm_xor_si128(x, t);
    t = _mm_slli_si128(t, 4);
    x = _mm_xor_si128(x, t);
    t = _mm_slli_si128(t, 4);
    return _mm_xor_si128(x, t);
}

TARGET static inline __m128i
expand_a(__m128i a, __m128i assist)
{
    return _mm_xor_si128(xor_words_below(a), _mm_shuffle_epi32(assist, 0xff));
}

TARGET static inline __m128i
expand_b(__m128i a, __m128i c)
{
    return _mm_xor_si128(xor_words_below(c), _mm_shuffle_epi32(_mm_aeskeygenassist_si128(a, 0), 0xaa));
}

#define EXPAND_STEP(i, rcon)                                                  \
    do {                                                                      \
        a = expand_a(a, _mm_aeskeygenassist_si128(c, rcon));                  \
        rk[i] = a;                                                            \
        if ((i) + 1 <= ROUNDS) {                                              \
            c = expand_b(a, c);                                               \
            rk[(i) + 1] = c;                                                  \
        }                                                                     \
    } while (0)

TARGET static void
expand256(const unsigned char *key, __m128i *rk)
{
    __m128i a = _mm_loadu_si128((const __m128i *)key);
    __m128i c = _mm_loadu_si128((const __m128i *)(key + 16));
    rk[0] = a;
    rk[1] = c;
    EXPAND_STEP(2, 0x01);
    EXPAND_STEP(4, 0x02);
    EXPAND_STEP(6, 0x04);
    EXPAND_STEP(8, 0x08);
    EXPAND_STEP(10, 0x10);
    EXPAND_STEP(12, 0x20);
    EXPAND_STEP(14, 0x40);
}

/* `clear` is 0 only in the register test's control run (registers_after_expand). */
TARGET static void
expand_all(const unsigned char *key64, unsigned char *sched, int clear)
{
    __m128i ek[ROUNDS + 1], dk[ROUNDS + 1], tk[ROUNDS + 1];
    expand256(key64, ek);
    expand256(key64 + 32, tk);
    dk[0] = ek[ROUNDS];
    for (int r = 1; r < ROUNDS; r++)
        dk[r] = _mm_aesimc_si128(ek[ROUNDS - r]);
    dk[ROUNDS] = ek[0];
    memcpy(sched, ek, sizeof ek);
    memcpy(sched + sizeof ek, dk, sizeof dk);
    memcpy(sched + 2 * sizeof ek, tk, sizeof tk);
    /* the copies on this stack frame */
    __m128i z = _mm_setzero_si128();
    for (int r = 0; r <= ROUNDS; r++) {
        ((volatile __m128i *)ek)[r] = z;
        ((volatile __m128i *)dk)[r] = z;
        ((volatile __m128i *)tk)[r] = z;
    }
    if (clear)
        clear_vectors();
}

/* ---- tweaks ---- */

/* t * alpha in GF(2^128), IEEE 1619 bit order */
TARGET static inline __m128i
mul_alpha(__m128i t)
{
    uint64_t lo = (uint64_t)_mm_cvtsi128_si64(t), hi = (uint64_t)_mm_extract_epi64(t, 1);
    uint64_t carry = hi >> 63;
    hi = (hi << 1) | (lo >> 63);
    lo = (lo << 1) ^ (0x87 & (0 - carry));
    return _mm_set_epi64x((long long)hi, (long long)lo);
}

/* Each 128-bit lane times alpha^k, 0 < k <= 56: a 128-bit shift, and the
 * bits shifted out folded back in by carry-less multiplication with 0x87. */
TARGET static inline __m512i
mul_alpha_k(__m512i t, int k, __m512i poly)
{
    __m512i shifted = _mm512_or_si512(_mm512_slli_epi64(t, k),
                                      _mm512_srli_epi64(_mm512_bslli_epi128(t, 8), 64 - k));
    __m512i top = _mm512_srli_epi64(_mm512_bsrli_epi128(t, 8), 64 - k);
    return _mm512_xor_si512(shifted, _mm512_clmulepi64_epi128(top, poly, 0x00));
}

/* Each 128-bit lane times alpha^(8*B), 0 < B <= 7 whole bytes: a byte shift
 * and one carry-less multiplication (the loop's tweak step, B = 2 for
 * sixteen blocks per turn, half the instructions of mul_alpha_k). */
#define MUL_ALPHA_BYTES(t, B, poly)                                           \
    _mm512_xor_si512(_mm512_bslli_epi128((t), (B)),                           \
                     _mm512_clmulepi64_epi128(_mm512_bsrli_epi128((t), 16 - (B)), (poly), 0x00))

/* One block through AES-256 with round keys rk: aes_enc1 encrypts,
 * aes_dec1 decrypts (with the inverse schedule).  One body, two round
 * instructions. */
#define AES_ONE_BLOCK(name, round, last)                                      \
    TARGET static inline __m128i name(__m128i x, const __m128i *rk)           \
    {                                                                         \
        x = _mm_xor_si128(x, _mm_loadu_si128(rk));                            \
        for (int r = 1; r < ROUNDS; r++)                                      \
            x = round(x, _mm_loadu_si128(rk + r));                            \
        return last(x, _mm_loadu_si128(rk + ROUNDS));                         \
    }
AES_ONE_BLOCK(aes_enc1, _mm_aesenc_si128, _mm_aesenclast_si128)
AES_ONE_BLOCK(aes_dec1, _mm_aesdec_si128, _mm_aesdeclast_si128)

/* Registers of four blocks each in flight per loop turn: enough independent
 * AES chains to cover the instruction's latency. */
#ifndef WAYS
#define WAYS 4
#endif
#define BLOCKS_PER_TURN (4 * WAYS)

/* Rounds 1 to 14 of the WAYS registers x, with the broadcast round keys k:
 * round and last are the encryption or the decryption instructions. */
#define ROUNDS_WIDE(x, k, round, last)                                        \
    do {                                                                      \
        for (int r = 1; r < ROUNDS; r++)                                      \
            _Pragma("GCC unroll 8")                                           \
            for (int v = 0; v < WAYS; v++)                                    \
                (x)[v] = round((x)[v], (k)[r]);                               \
        _Pragma("GCC unroll 8")                                               \
        for (int v = 0; v < WAYS; v++)                                        \
            (x)[v] = last((x)[v], (k)[ROUNDS]);                               \
    } while (0)

/* One data unit of `len` bytes (a multiple of 16) with a 16-byte tweak. */
TARGET static void
crypt_unit(const unsigned char *sched, const unsigned char *tweak16, const unsigned char *in,
           unsigned char *out, size_t len, int enc)
{
    const __m128i *ek = (const __m128i *)sched;
    const __m128i *dk = ek + (ROUNDS + 1);
    const __m128i *tk = dk + (ROUNDS + 1);
    const __m128i *ck = enc ? ek : dk;
    __m128i t = aes_enc1(_mm_loadu_si128((const __m128i *)tweak16), tk);
    size_t nblocks = len / 16, j = 0;

    if (nblocks >= BLOCKS_PER_TURN) {
        __m512i k[ROUNDS + 1], w[WAYS], x[WAYS];
        for (int r = 0; r <= ROUNDS; r++)
            k[r] = _mm512_broadcast_i32x4(_mm_loadu_si128(ck + r));
        const __m512i poly = _mm512_set1_epi64(0x87);
        __m128i t1 = mul_alpha(t), t2 = mul_alpha(t1), t3 = mul_alpha(t2);
        w[0] = _mm512_inserti32x4(_mm512_castsi128_si512(t), t1, 1);
        w[0] = _mm512_inserti32x4(w[0], t2, 2);
        w[0] = _mm512_inserti32x4(w[0], t3, 3);
        for (int v = 1; v < WAYS; v++)
            w[v] = mul_alpha_k(w[v - 1], 4, poly);
        for (; j + BLOCKS_PER_TURN <= nblocks; j += BLOCKS_PER_TURN) {
            const unsigned char *p = in + j * 16;
            unsigned char *q = out + j * 16;
#pragma GCC unroll 8
            for (int v = 0; v < WAYS; v++)
                x[v] = _mm512_xor_si512(_mm512_xor_si512(_mm512_loadu_si512(p + 64 * v), w[v]), k[0]);
            if (enc)
                ROUNDS_WIDE(x, k, _mm512_aesenc_epi128, _mm512_aesenclast_epi128);
            else
                ROUNDS_WIDE(x, k, _mm512_aesdec_epi128, _mm512_aesdeclast_epi128);
#pragma GCC unroll 8
            for (int v = 0; v < WAYS; v++) {
                _mm512_storeu_si512(q + 64 * v, _mm512_xor_si512(x[v], w[v]));
                w[v] = MUL_ALPHA_BYTES(w[v], BLOCKS_PER_TURN / 8, poly);
            }
        }
        t = _mm512_castsi512_si128(w[0]); /* the tweak of block j */
        /* the broadcast round keys and tweaks on this frame */
        for (int r = 0; r <= ROUNDS; r++)
            ((volatile __m512i *)k)[r] = _mm512_setzero_si512();
        for (int v = 0; v < WAYS; v++)
            ((volatile __m512i *)w)[v] = ((volatile __m512i *)x)[v] = _mm512_setzero_si512();
    }
    for (; j < nblocks; j++) {
        __m128i x = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(in + j * 16)), t);
        x = enc ? aes_enc1(x, ek) : aes_dec1(x, dk);
        _mm_storeu_si128((__m128i *)(out + j * 16), _mm_xor_si128(x, t));
        t = mul_alpha(t);
    }
}

struct vaes {
    const unsigned char *sched;
    int enc;
};

/* One sector as one data unit (a sector_fn). */
TARGET static int
vaes_sector(void *arg, const unsigned char *tweak16, const unsigned char *in, unsigned char *out, Py_ssize_t len)
{
    const struct vaes *v = arg;
    crypt_unit(v->sched, tweak16, in, out, (size_t)len, v->enc);
    return 1;
}

/* `clear` is 0 only in the register test's control run (registers_after_crypt). */
TARGET static void
crypt_run(const unsigned char *sched, unsigned __int128 first, unsigned long long iv_mul,
          const unsigned char *in, unsigned char *out, Py_ssize_t n, Py_ssize_t sector, int enc,
          int skip_zero, int clear)
{
    struct vaes v = {sched, enc};
    run_sectors(vaes_sector, &v, first, iv_mul, in, out, n, sector, skip_zero);
    if (clear)
        clear_vectors();
}

static int supported = -1;

static int
check_sched(Py_buffer *sched)
{
    if (supported != 1) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU has no VAES/AVX-512");
        return 0;
    }
    if (sched->len != SCHED_SIZE) {
        PyErr_SetString(PyExc_ValueError, "bad key schedule size");
        return 0;
    }
    return 1;
}

/* IEEE 1619 / FIPS: with equal halves XTS degenerates.  SectorCipher refuses
 * such a key; so does this, the lowest layer, for any other caller. */
static int
halves_equal(const unsigned char *key64)
{
    unsigned char diff = 0;
    for (int b = 0; b < 32; b++)
        diff |= key64[b] ^ key64[32 + b];
    return diff == 0;
}

/* A 64-byte XTS key, or a ValueError. */
static int
check_key(const Py_buffer *key)
{
    if (key->len != 64) {
        PyErr_SetString(PyExc_ValueError, "XTS-AES-256 needs a 64-byte key");
        return 0;
    }
    return 1;
}

/* Release the buffers a call parsed (b and c may be NULL) and return ret. */
static PyObject *
release(PyObject *ret, Py_buffer *a, Py_buffer *b, Py_buffer *c)
{
    PyBuffer_Release(a);
    if (b)
        PyBuffer_Release(b);
    if (c)
        PyBuffer_Release(c);
    return ret;
}

static PyObject *
py_expand(PyObject *self, PyObject *args)
{
    Py_buffer key, sched;
    if (!PyArg_ParseTuple(args, "y*w*", &key, &sched))
        return NULL;
    if (!check_sched(&sched) || !check_key(&key))
        return release(NULL, &key, &sched, NULL);
    if (halves_equal(key.buf)) {
        PyErr_SetString(PyExc_ValueError, "XTS key halves must differ");
        return release(NULL, &key, &sched, NULL);
    }
    expand_all(key.buf, sched.buf, 1);
    return release(Py_NewRef(Py_None), &key, &sched, NULL);
}

static PyObject *
py_crypt_sectors(PyObject *self, PyObject *args)
{
    Py_buffer sched, src, dst;
    unsigned long long first_lo, first_hi, iv_mul;
    Py_ssize_t sector;
    int enc, skip_zero = 0;
    if (!PyArg_ParseTuple(args, "y*KKKy*w*ni|p", &sched, &first_lo, &first_hi, &iv_mul, &src, &dst, &sector,
                          &enc, &skip_zero))
        return NULL;
    if (!check_sched(&sched) || !whole_sectors(&src, &dst, sector, 16))
        return release(NULL, &sched, &src, &dst);
    Py_ssize_t n = src.len / sector;
    unsigned __int128 first = ((unsigned __int128)first_hi << 64) | first_lo;
    if (n > GIL_KEEP_SECTORS) {
        Py_BEGIN_ALLOW_THREADS
        crypt_run(sched.buf, first, iv_mul, src.buf, dst.buf, n, sector, enc, skip_zero, 1);
        Py_END_ALLOW_THREADS
    } else {
        crypt_run(sched.buf, first, iv_mul, src.buf, dst.buf, n, sector, enc, skip_zero, 1);
    }
    return release(Py_NewRef(Py_None), &sched, &src, &dst);
}

static PyObject *
py_crypt_unit(PyObject *self, PyObject *args)
{
    Py_buffer sched, tweak, src, dst;
    int enc;
    if (!PyArg_ParseTuple(args, "y*y*y*w*i", &sched, &tweak, &src, &dst, &enc))
        return NULL;
    PyObject *ret = NULL;
    if (check_sched(&sched)) {
        if (tweak.len != 16 || src.len % 16 || dst.len < src.len) {
            PyErr_SetString(PyExc_ValueError, "need a 16-byte tweak and whole 16-byte blocks");
        } else {
            crypt_unit(sched.buf, tweak.buf, src.buf, dst.buf, (size_t)src.len, enc);
            clear_vectors();
            ret = Py_NewRef(Py_None);
        }
    }
    PyBuffer_Release(&tweak);
    return release(ret, &sched, &src, &dst);
}

/* ---- for the test suite: the vector registers right after a call ---- */

/* zmm0-31 into out (32 * 64 bytes), stored by the same asm statement so that
 * no other code runs between the call and the reading. */
#define DUMP_ZMM(out)                                                         \
    __asm__ volatile("vmovdqu64 %%zmm0, 0(%0)\n\t"                           \
                     "vmovdqu64 %%zmm1, 64(%0)\n\t"                          \
                     "vmovdqu64 %%zmm2, 128(%0)\n\t"                         \
                     "vmovdqu64 %%zmm3, 192(%0)\n\t"                         \
                     "vmovdqu64 %%zmm4, 256(%0)\n\t"                         \
                     "vmovdqu64 %%zmm5, 320(%0)\n\t"                         \
                     "vmovdqu64 %%zmm6, 384(%0)\n\t"                         \
                     "vmovdqu64 %%zmm7, 448(%0)\n\t"                         \
                     "vmovdqu64 %%zmm8, 512(%0)\n\t"                         \
                     "vmovdqu64 %%zmm9, 576(%0)\n\t"                         \
                     "vmovdqu64 %%zmm10, 640(%0)\n\t"                        \
                     "vmovdqu64 %%zmm11, 704(%0)\n\t"                        \
                     "vmovdqu64 %%zmm12, 768(%0)\n\t"                        \
                     "vmovdqu64 %%zmm13, 832(%0)\n\t"                        \
                     "vmovdqu64 %%zmm14, 896(%0)\n\t"                        \
                     "vmovdqu64 %%zmm15, 960(%0)\n\t"                        \
                     "vmovdqu64 %%zmm16, 1024(%0)\n\t"                       \
                     "vmovdqu64 %%zmm17, 1088(%0)\n\t"                       \
                     "vmovdqu64 %%zmm18, 1152(%0)\n\t"                       \
                     "vmovdqu64 %%zmm19, 1216(%0)\n\t"                       \
                     "vmovdqu64 %%zmm20, 1280(%0)\n\t"                       \
                     "vmovdqu64 %%zmm21, 1344(%0)\n\t"                       \
                     "vmovdqu64 %%zmm22, 1408(%0)\n\t"                       \
                     "vmovdqu64 %%zmm23, 1472(%0)\n\t"                       \
                     "vmovdqu64 %%zmm24, 1536(%0)\n\t"                       \
                     "vmovdqu64 %%zmm25, 1600(%0)\n\t"                       \
                     "vmovdqu64 %%zmm26, 1664(%0)\n\t"                       \
                     "vmovdqu64 %%zmm27, 1728(%0)\n\t"                       \
                     "vmovdqu64 %%zmm28, 1792(%0)\n\t"                       \
                     "vmovdqu64 %%zmm29, 1856(%0)\n\t"                       \
                     "vmovdqu64 %%zmm30, 1920(%0)\n\t"                       \
                     "vmovdqu64 %%zmm31, 1984(%0)"                             \
                     ::"r"(out) : "memory")

/* How the control runs differ from the real path: CLEAR_NONE skips the
 * clearing, CLEAR_ZEROALL does only what this code did before (VZEROALL),
 * CLEAR_FULL is the path every real call takes. */
enum { CLEAR_NONE = 0, CLEAR_ZEROALL = 1, CLEAR_FULL = 2 };

TARGET __attribute__((noinline)) static void
crypt_then_dump(const unsigned char *sched, const unsigned char *in, unsigned char *out, Py_ssize_t n,
                Py_ssize_t sector, int enc, int how, unsigned char *regs)
{
    crypt_run(sched, 0, 1, in, out, n, sector, enc, 0, how == CLEAR_FULL);
    if (how == CLEAR_ZEROALL)
        _mm256_zeroall();
    DUMP_ZMM(regs);
}

TARGET __attribute__((noinline)) static void
expand_then_dump(const unsigned char *key64, unsigned char *sched, int how, unsigned char *regs)
{
    expand_all(key64, sched, how == CLEAR_FULL);
    if (how == CLEAR_ZEROALL)
        _mm256_zeroall();
    DUMP_ZMM(regs);
}

static PyObject *
py_registers_after_crypt(PyObject *self, PyObject *args)
{
    Py_buffer sched, src, dst;
    Py_ssize_t sector;
    int enc, how;
    if (!PyArg_ParseTuple(args, "y*y*w*nii", &sched, &src, &dst, &sector, &enc, &how))
        return NULL;
    if (!check_sched(&sched) || !whole_sectors(&src, &dst, sector, 16))
        return release(NULL, &sched, &src, &dst);
    unsigned char regs[DUMP_SIZE] __attribute__((aligned(64)));
    crypt_then_dump(sched.buf, src.buf, dst.buf, src.len / sector, sector, enc, how, regs);
    return release(PyBytes_FromStringAndSize((const char *)regs, DUMP_SIZE), &sched, &src, &dst);
}

static PyObject *
py_registers_after_expand(PyObject *self, PyObject *args)
{
    Py_buffer key, sched;
    int how;
    if (!PyArg_ParseTuple(args, "y*w*i", &key, &sched, &how))
        return NULL;
    if (!check_sched(&sched) || !check_key(&key))
        return release(NULL, &key, &sched, NULL);
    unsigned char regs[DUMP_SIZE] __attribute__((aligned(64)));
    expand_then_dump(key.buf, sched.buf, how, regs);
    return release(PyBytes_FromStringAndSize((const char *)regs, DUMP_SIZE), &key, &sched, NULL);
}

#else /* !HAVE_VAES: the stub */

static int supported = 0;

static PyObject *
not_built(PyObject *self, PyObject *args)
{
    PyErr_SetString(PyExc_RuntimeError, "_xtsvaes was built without VAES (the compiler lacks the intrinsics)");
    return NULL;
}
#define py_expand not_built
#define py_crypt_sectors not_built
#define py_crypt_unit not_built
#define py_registers_after_crypt not_built
#define py_registers_after_expand not_built
#endif /* HAVE_VAES */

static PyMethodDef methods[] = {
    {"expand", py_expand, METH_VARARGS,
     "expand(key64, sched)\n\nFill sched (SCHED_SIZE bytes) with the round keys of a 64-byte XTS key."},
    {"crypt_sectors", py_crypt_sectors, METH_VARARGS,
     "crypt_sectors(sched, first_lo, first_hi, iv_per_sector, src, dst, sector_size, enc, skip_zero=False)\n\n"
     "The first sector number is first_hi * 2**64 + first_lo; tweaks wrap at 2**128.\n"
     "With skip_zero, all-zero sectors of src are not run through the cipher: they come out as zeros."},
    {"crypt_unit", py_crypt_unit, METH_VARARGS,
     "crypt_unit(sched, tweak16, src, dst, enc)\n\nOne XTS data unit (whole blocks) with an explicit tweak."},
    {"_registers_after_crypt", py_registers_after_crypt, METH_VARARGS,
     "_registers_after_crypt(sched, src, dst, sector_size, enc, how) -> bytes\n\n"
     "For the tests: crypt_sectors from sector 0 (iv_per_sector 1), then zmm0-31 as read\n"
     "right after it (32 * 64 bytes).  how: 2 = the real path, 1 = VZEROALL only, 0 = no clearing."},
    {"_registers_after_expand", py_registers_after_expand, METH_VARARGS,
     "_registers_after_expand(key64, sched, how) -> bytes\n\nFor the tests: expand, then zmm0-31 (how as above)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_xtsvaes", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__xtsvaes(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
#if HAVE_VAES
    supported = cpu_supported();
#endif
#if HAVE_VAES
    /* crypt_run for C callers (see xts_run_fn): only where it can run */
    if (supported && PyModule_AddObject(m, "CRYPT_RUN",
                                        PyCapsule_New((void *)(xts_run_fn)crypt_run, XTS_RUN_CAPSULE, NULL)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#endif
    if (PyModule_AddIntConstant(m, "SCHED_SIZE", SCHED_SIZE) < 0 ||
        PyModule_AddObject(m, "BUILT", PyBool_FromLong(HAVE_VAES)) < 0 ||
        PyModule_AddIntConstant(m, "DUMP_SIZE", DUMP_SIZE) < 0 ||
        PyModule_AddObject(m, "SUPPORTED", PyBool_FromLong(supported)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
