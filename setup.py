"""Only for the optional C sector loop; everything else is in pyproject.toml.

The extension is optional: without a compiler evscrypt still installs and
falls back to the ctypes loop (evscrypt/crypto/evp.py).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("evscrypt.crypto._xtsloop", ["evscrypt/crypto/_xtsloop.c"],
                             extra_compile_args=["-O2"], optional=True)])
