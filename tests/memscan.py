"""Search a live process's whole memory for byte strings, and say for each
occurrence whether its mapping is locked.

Reads /proc/PID/maps and /proc/PID/smaps (VmFlags: ``lo`` is VM_LOCKED,
what mlock and mlockall set) and the memory itself through /proc/PID/mem.
Needs root (the daemon is non-dumpable, so CAP_SYS_PTRACE).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_HEAD = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str
    name: str
    flags: frozenset[str]

    @property
    def locked(self) -> bool:
        return "lo" in self.flags

    def __str__(self) -> str:
        flags = " ".join(sorted(self.flags))
        return f"{self.start:x}-{self.end:x} {self.perms} {self.name or '[anon]'} VmFlags: {flags}"


def mappings(pid: int | str) -> list[Mapping]:
    out: list[Mapping] = []
    head = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = _HEAD.match(line)
        if m:
            head = m
        elif line.startswith("VmFlags:") and head is not None:
            out.append(Mapping(int(head.group(1), 16), int(head.group(2), 16), head.group(3), head.group(4),
                               frozenset(line.split()[1:])))
            head = None
    return out


@dataclass(frozen=True)
class Hit:
    address: int
    mapping: Mapping


PAGE = 4096


def _read(mem, start: int, end: int) -> bytes:
    """The readable bytes of [start, end), a page of zeros for each page that
    cannot be read, so that offsets stay true.  /proc/PID/mem may return
    fewer bytes than asked for: read until the range is done."""
    out = bytearray()
    pos = start
    while pos < end:
        try:
            mem.seek(pos)
            chunk = mem.read(end - pos)
        except OSError:
            chunk = b""
        if not chunk:
            out += bytes(min(PAGE, end - pos))
            pos += min(PAGE, end - pos)
            continue
        out += chunk
        pos += len(chunk)
    return bytes(out)


def _runs(maps: list[Mapping]) -> list[list[Mapping]]:
    """Readable mappings grouped into runs of adjacent ones: an allocation
    may lie across the boundary of two mappings (the kernel splits one where
    flags change), and a needle there is found only in the whole run."""
    runs: list[list[Mapping]] = []
    for mp in maps:
        if "r" not in mp.perms or mp.name in ("[vvar]", "[vvar_vclock]", "[vsyscall]"):
            continue
        if runs and runs[-1][-1].end == mp.start:
            runs[-1].append(mp)
        else:
            runs.append([mp])
    return runs


def scan(pid: int | str, needles: dict[str, bytes]) -> dict[str, list[Hit]]:
    """Every occurrence of every needle in the process's readable memory,
    each with the mapping it starts in (and a hit across a boundary is
    reported unlocked unless both mappings are locked)."""
    found: dict[str, list[Hit]] = {k: [] for k in needles}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for run in _runs(mappings(pid)):
            start = run[0].start
            data = _read(mem, start, run[-1].end)
            for name, needle in needles.items():
                i = data.find(needle)
                while i >= 0:
                    found[name].append(Hit(start + i, _holding(run, start + i, start + i + len(needle))))
                    i = data.find(needle, i + 1)
    return found


def _holding(run: list[Mapping], lo: int, hi: int) -> Mapping:
    """The mapping a hit [lo, hi) starts in; if it runs into an unlocked
    mapping, that one, so a half-unlocked key is reported as unlocked."""
    spanned = [mp for mp in run if mp.start < hi and lo < mp.end]
    return next((mp for mp in spanned if not mp.locked), spanned[0])
