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


def scan(pid: int | str, needles: dict[str, bytes]) -> dict[str, list[Hit]]:
    """Every occurrence of every needle in the process's readable memory."""
    found: dict[str, list[Hit]] = {k: [] for k in needles}
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for mp in mappings(pid):
            if "r" not in mp.perms or mp.name in ("[vvar]", "[vvar_vclock]", "[vsyscall]"):
                continue
            try:
                mem.seek(mp.start)
                data = mem.read(mp.end - mp.start)
            except OSError:
                continue
            for name, needle in needles.items():
                i = data.find(needle)
                while i >= 0:
                    found[name].append(Hit(mp.start + i, mp))
                    i = data.find(needle, i + 1)
    return found
