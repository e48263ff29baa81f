"""Only for the optional C extensions; everything else is in pyproject.toml.

The XTS extensions need nothing but a C compiler and the Python headers (no
network, no libraries to link): _xtsloop calls libcrypto through function
pointers it is handed at run time.  Both are optional: without a compiler
evscrypt still installs and falls back to the ctypes loop
(evscrypt/crypto/evp.py).  _cpath, the C data path of the daemon, needs
the kernel's linux/fuse.h too; without it the daemon serves every request
in Python.  _xtsvaes is built everywhere; where the compiler
lacks the VAES/AVX-512 intrinsics (probed below) or off x86-64 it builds as
a stub that reports itself unsupported, and EVP runs.
"""

import os
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

#: A function that needs every intrinsic _xtsvaes.c uses, under the same
#: target attribute: if this compiles, so does the real code.
VAES_PROBE = r"""
#include <immintrin.h>
__attribute__((target("aes,sse4.1,avx2,avx512f,avx512bw,avx512vl,vaes,vpclmulqdq")))
__m512i probe(__m512i a, __m512i b)
{
    a = _mm512_clmulepi64_epi128(a, b, 0x01);
    a = _mm512_aesenc_epi128(a, b);
    a = _mm512_aesdeclast_epi128(a, b);
    return _mm512_ternarylogic_epi64(a, b, a, 0x96);
}
"""


class BuildExt(build_ext):
    def build_extension(self, ext):
        if ext.name.endswith("._xtsvaes") and not self._compiler_has_vaes():
            print("setup.py: the C compiler lacks the VAES/AVX-512 intrinsics; _xtsvaes is built as a stub")
            ext.define_macros = [*ext.define_macros, ("EVSCRYPT_NO_VAES", "1")]
        super().build_extension(ext)

    def _compiler_has_vaes(self) -> bool:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "vaes_probe.c")
            with open(src, "w") as f:
                f.write(VAES_PROBE)
            try:
                self.compiler.compile([src], output_dir=tmp, extra_postargs=["-O0"])
            except Exception:  # CompileError, or no usable compiler at all
                return False
        return True


#: The sector loop both extensions include; listed so that a change to it
#: rebuilds them and the sdist ships it.
SHARED = ["evscrypt/crypto/_xtssector.h"]
ext = [Extension("evscrypt.crypto._xtsloop", ["evscrypt/crypto/_xtsloop.c"], depends=SHARED,
                 extra_compile_args=["-O2"], optional=True),
       Extension("evscrypt.crypto._xtsvaes", ["evscrypt/crypto/_xtsvaes.c"], depends=SHARED,
                 extra_compile_args=["-O2"], optional=True),
       # the C data path (evscrypt/daemon/cpath.py); Linux only (linux/fuse.h)
       # (librbd, for volumes in an RBD pool, is bound at run time to the copy python-rbd loaded)
       Extension("evscrypt.daemon._cpath", ["evscrypt/daemon/_cpath.c", "evscrypt/daemon/_cpath_rbd.c"],
                 depends=[*SHARED, "evscrypt/daemon/_cpath.h"],
                 extra_compile_args=["-O2"], optional=True)]
setup(ext_modules=ext, cmdclass={"build_ext": BuildExt})
