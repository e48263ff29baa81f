"""Only for the optional C extensions; everything else is in pyproject.toml.

Both extensions are optional: without a compiler evscrypt still installs and
falls back to the ctypes loop (evscrypt/crypto/evp.py).  _xtsvaes is compiled
for every x86-64 machine but only used where the CPU has VAES and AVX-512.
"""

import platform

from setuptools import Extension, setup

ext = [Extension("evscrypt.crypto._xtsloop", ["evscrypt/crypto/_xtsloop.c"],
                 extra_compile_args=["-O2"], optional=True)]
if platform.machine() in ("x86_64", "AMD64"):
    ext.append(Extension("evscrypt.crypto._xtsvaes", ["evscrypt/crypto/_xtsvaes.c"],
                         extra_compile_args=["-O2"], optional=True))
setup(ext_modules=ext)
