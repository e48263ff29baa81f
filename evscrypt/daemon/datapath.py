"""Which FUSE data path this pyfuse3 can run, found by probing it once at start.

evscrypt's build of pyfuse3 3.5.0 (``make install``, scripts/build-pyfuse3.sh)
has two things stock pyfuse3 lacks:

* ``main_threads()`` (patches/pyfuse3-3.5.0-threads.patch): worker threads
  that answer reads and writes synchronously (``read_sync``/``write_sync``
  in ops.py).  This is the ``threads`` path, the fast one.
* the fallocate op (patches/pyfuse3-3.5.0-fallocate.patch), through which
  discard (``fstrim``, ``fallocate --punch-hole``) frees space in the image.

Stock pyfuse3 (``pip install evscrypt``) runs the ``trio`` path: ``pyfuse3.main()``
serves every request as a trio task, reads and writes through the async
handlers with the engine call in a thread.  Slower, and the kernel answers
fallocate(2) with EOPNOTSUPP since the op never reaches Python.

``main_threads`` is evscrypt's own interface: a pyfuse3 that has it but is
not the build of those patches (some other version, or someone else's patch)
is refused rather than trusted.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import UnsupportedFeature

#: The pyfuse3 release the patches are made for; the build's version is
#: PATCHED_VERSION + "+evscrypt." + a digest of the patches.
PATCHED_VERSION = "3.5.0"
PATCHED_LABEL = "+evscrypt."


@dataclass(frozen=True)
class DataPath:
    name: str  # "threads" or "trio"
    discard: bool  # whether fallocate reaches Operations.fallocate
    pyfuse3_version: str

    def describe(self) -> str:
        """One line for the log and ``--version``."""
        how = ("FUSE worker threads, synchronous reads and writes" if self.name == "threads"
               else "pyfuse3.main(), reads and writes as trio tasks (slower)")
        build = "patched" if PATCHED_LABEL in self.pyfuse3_version else "stock"
        disc = "discard on" if self.discard else "discard answers EOPNOTSUPP"
        return f"{self.name} ({how}; {disc}; {build} pyfuse3 {self.pyfuse3_version})"

    def main(self, threads: int):
        """The coroutine function that serves FUSE requests until unmount."""
        import pyfuse3

        if self.name == "threads":
            return functools.partial(pyfuse3.main_threads, threads)
        return pyfuse3.main


def probe(pyfuse3=None) -> DataPath:
    """Look at the installed pyfuse3 (or the module given) and say which
    data path it can run; UnsupportedFeature if it has main_threads but is
    not evscrypt's patched build."""
    if pyfuse3 is None:
        import pyfuse3
    version = str(getattr(pyfuse3, "__version__", "unknown"))
    threads = callable(getattr(pyfuse3, "main_threads", None))
    if threads and not version.startswith(PATCHED_VERSION + PATCHED_LABEL):
        raise UnsupportedFeature(
            f"pyfuse3 {version} has main_threads() but is not evscrypt's patched build of pyfuse3 "
            f"{PATCHED_VERSION}: run `make install` in the evscrypt checkout (scripts/build-pyfuse3.sh), "
            f"or install stock pyfuse3 (`pip install --force-reinstall --no-deps pyfuse3`) for the trio data path")
    discard = callable(getattr(pyfuse3.Operations, "fallocate", None))
    return DataPath("threads" if threads else "trio", discard, version)
