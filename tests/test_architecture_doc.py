"""docs/ARCHITECTURE.md names modules and functions at every step of its
flows; this keeps those names true as the code moves.

Every backticked reference that looks like code is checked: a file path
must exist, and a dotted name (``VolumeManager.attach``,
``cli/core.attach``, ``format.sector_to_backing``) must be defined, in the
module it names when it names one.  The check reads source text (no
imports): a rename that leaves the page behind fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "evscrypt"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
FILE_SUFFIXES = (".py", ".c", ".h", ".md", ".patch")
CODE_REF = re.compile(r"^[A-Za-z_][\w/]*(?:\.[A-Za-z_]\w*)+(?:\(\))?$")


def _defines(text: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+def|def|class)\s+{name}\b|^\s*{name}\s*[:=]|"
                     rf"^\s*self\.{name}\s*[:=]|^\s*#define\s+{name}\b", text, re.M) is not None


def _module(ref: str) -> Path | None:
    """The source file a dotted reference's module part names, if any."""
    parts = ref.split(".")
    for n in range(len(parts) - 1, 0, -1):
        base = PKG.joinpath(*"/".join(parts[:n]).split("/"))
        for cand in (base.with_suffix(".py"), base / "__init__.py"):
            if cand.is_file():
                return cand
    return None


def references() -> list[str]:
    refs = set(re.findall(r"`([^`\s]+)`", DOC.read_text()))
    return sorted(r for r in refs if CODE_REF.match(r) or r.endswith(FILE_SUFFIXES))


def test_the_page_names_code_at_all():
    refs = references()
    assert len(refs) > 40, refs  # the flows name a module or function at every step


def test_every_name_on_the_page_exists():
    everything = "\n".join(p.read_text() for p in PKG.rglob("*") if p.suffix in (".py", ".c", ".h"))
    missing = []
    for ref in references():
        if ref.endswith(FILE_SUFFIXES):
            if not any((base / ref).exists() for base in (ROOT, PKG, PKG / "crypto", PKG / "daemon")):
                missing.append(ref)
            continue
        name = ref.removesuffix("()").split(".")[-1]
        if ref.startswith("pyfuse3."):  # evscrypt's additions to pyfuse3 live in its patch
            text = (ROOT / "patches" / "pyfuse3-3.5.0-threads.patch").read_text()
            if re.search(rf"^\+\s*(?:async\s+def|def|cdef|cpdef)\s+{name}\b", text, re.M) is None:
                missing.append(ref)
            continue
        mod = _module(ref.removesuffix("()"))
        text = mod.read_text() if mod is not None else everything
        if not _defines(text, name):
            missing.append(ref)
    assert not missing, f"docs/ARCHITECTURE.md names what the code does not have: {missing}"
