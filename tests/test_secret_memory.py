"""The memory a Secret lives in, checked against the kernel.

Page locks are read from /proc/self/smaps (VmFlags ``lo``).  Every process
that makes a secret is non-dumpable (prctl), and when prctl cannot do that,
the secret is refused: a seccomp filter makes it fail for real.
Process-wide locking (mlockall) runs in child processes, so this test
process stays as it is.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap

import pytest

from evscrypt import secret
from evscrypt.secret import Secret, b64_decode, b64_encode

from memscan import mappings


def page_is_locked(addr: int, pid: str = "self") -> bool:
    for m in mappings(pid):
        if m.start <= addr < m.end:
            return m.locked
    raise AssertionError(f"{addr:x} is not mapped")


def two_secrets_on_one_page() -> tuple[Secret, Secret, int, list[Secret]]:
    """Small secrets share pages (they come from the same allocator arena);
    find two on a page that no other live secret uses."""
    made = []
    for _ in range(1000):
        s = Secret(32)
        made.append(s)
        page = s._addr - s._addr % secret.PAGE_SIZE
        same = [t for t in made if t._addr - t._addr % secret.PAGE_SIZE == page
                and t._addr + len(t) <= page + secret.PAGE_SIZE and s._addr + len(s) <= page + secret.PAGE_SIZE]
        if len(same) == 2 and secret.page_locked_count(page) == 2:
            rest = [t for t in made if t not in same]
            return same[0], same[1], page, rest
    raise AssertionError("no two small secrets on one page")


@pytest.mark.skipif(secret.all_memory_locked(), reason="this process locked all its memory")
def test_wiping_one_secret_keeps_the_page_locked_for_another():
    a, b, page, rest = two_secrets_on_one_page()
    for s in rest:
        s.wipe()
    assert a.locked and b.locked
    assert page_is_locked(page)
    a.wipe()
    assert page_is_locked(page), "wiping one secret unlocked the page another secret lives on"
    assert secret.page_locked_count(page) == 1
    b.wipe()
    assert secret.page_locked_count(page) == 0
    assert not page_is_locked(page), "the last secret's wipe unlocks its page"


def test_random_secrets_are_read_into_the_buffer(monkeypatch):
    monkeypatch.setattr(os, "urandom", None)  # not used: getrandom writes into the locked buffer
    a, b = Secret.random(64), Secret.random(64)
    assert bytes(a.buffer) != bytes(b.buffer) and any(a.buffer)
    buf = bytearray(1000)
    secret.random_into(memoryview(buf)[10:990])
    assert buf[:10] == bytes(10) and buf[990:] == bytes(10) and any(buf[10:990])
    a.wipe(), b.wipe()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 31, 32, 33, 64])
def test_base64_of_secrets_matches_the_standard_library(n):
    raw = os.urandom(n)
    with Secret.from_buffer(raw) as s, b64_encode(s) as text:
        assert bytes(text.buffer) == base64.b64encode(raw)
        with b64_decode(text.buffer) as back:
            assert bytes(back.buffer) == raw


@pytest.mark.parametrize("bad", [b"abc", b"ab=c", b"a*cd", b"====", b"Zm9v\n"])
def test_base64_decode_refuses_what_is_not_base64(bad):
    with pytest.raises(ValueError):
        b64_decode(bad)


def run_child(code: str, *prefix: str) -> subprocess.CompletedProcess:
    """Python ``code`` in a new process (tests/ on its path)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_a_secret_makes_the_process_non_dumpable():
    p = run_child("""
        import ctypes
        from evscrypt.secret import Secret
        libc = ctypes.CDLL(None)
        before = libc.prctl(3, 0, 0, 0, 0)
        s = Secret(64)
        print(before, libc.prctl(3, 0, 0, 0, 0))
    """)
    assert p.stdout.split() == ["1", "0"], p.stderr


SECCOMP_DENY_SET_DUMPABLE = """
    import ctypes, struct
    libc = ctypes.CDLL(None, use_errno=True)
    # BPF: prctl(PR_SET_DUMPABLE, ...) fails with EPERM; everything else runs
    def stmt(code, k): return struct.pack("HBBI", code, 0, 0, k)
    def jump(code, k, jt, jf): return struct.pack("HBBI", code, jt, jf, k)
    LD_W_ABS, JEQ_K, RET_K = 0x20, 0x15, 0x06
    prog = b"".join([
        stmt(LD_W_ABS, 0), jump(JEQ_K, 157, 0, 3),        # nr == __NR_prctl (x86-64)
        stmt(LD_W_ABS, 16), jump(JEQ_K, 4, 0, 1),         # args[0] == PR_SET_DUMPABLE
        stmt(RET_K, 0x00050000 | 1),                      # SECCOMP_RET_ERRNO | EPERM
        stmt(RET_K, 0x7fff0000),                          # SECCOMP_RET_ALLOW
    ])
    buf = ctypes.create_string_buffer(prog)
    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = Fprog(len(prog) // 8, ctypes.addressof(buf))
    assert libc.prctl(38, 1, 0, 0, 0) == 0                # PR_SET_NO_NEW_PRIVS
    assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp filter uses x86-64 syscall numbers")
def test_no_secret_where_the_process_cannot_be_made_non_dumpable():
    p = run_child(SECCOMP_DENY_SET_DUMPABLE + """
    from evscrypt.errors import MemoryProtectionError
    from evscrypt.secret import Secret
    try:
        Secret(64)
    except MemoryProtectionError as e:
        print("refused", e.exit_code, e.message)
    else:
        print("made")
    """)
    assert p.stdout.startswith(f"refused 26 cannot make this process non-dumpable"), p.stdout + p.stderr
    assert "Operation not permitted" in p.stdout


def test_lock_all_memory_locks_everything_and_wiping_unlocks_nothing():
    p = run_child("""
        from evscrypt import secret
        from evscrypt.secret import Secret
        from memscan import mappings
        secret.lock_all_memory()
        keys = [Secret.random(64) for _ in range(50)]
        addrs = [k._addr for k in keys]
        for k in keys[:-1]:
            k.wipe()
        later = bytearray(1 << 20)  # memory mapped after the call is locked too (MCL_FUTURE)
        def locked(a):
            return next(m.locked for m in mappings("self") if m.start <= a < m.end)
        print(all(locked(a) for a in addrs), locked(id(later)), secret.all_memory_locked())
        with open("/proc/self/status") as f:
            print([l.split()[1] for l in f if l.startswith("VmLck")][0] != "0")
    """)
    assert p.stdout.split() == ["True", "True", "True", "True"], p.stdout + p.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop CAP_IPC_LOCK")
def test_lock_all_memory_failure_is_a_clear_error():
    p = run_child("""
        from evscrypt import secret
        from evscrypt.errors import MemoryProtectionError
        from memscan import mappings
        before = secret.Secret.random(64)
        try:
            secret.lock_all_memory()
        except MemoryProtectionError as e:
            print(e.exit_code, secret.all_memory_locked(), e.message)
        s = secret.Secret.random(64)   # still locked, page by page, within the limit
        print(s.locked, all(m.locked for m in mappings("self") for k in (before, s) if m.start <= k._addr < m.end))
    """, "prlimit", "--memlock=65536:65536", "setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "--")
    lines = p.stdout.splitlines()
    assert lines[0].startswith("26 False cannot lock memory to keep keys out of swap (mlockall: "), p.stdout + p.stderr
    assert "RLIMIT_MEMLOCK is 64 KiB" in lines[0] and "LimitMEMLOCK=infinity" in lines[0]
    assert lines[1] == "True True"


def test_a_forked_child_locks_the_pages_of_its_secrets_again():
    """Memory locks are not inherited across fork."""
    p = run_child("""
        import os
        from evscrypt.secret import Secret
        from memscan import mappings
        k = Secret.random(64)
        pid = os.fork()
        if pid == 0:
            ok = next(m.locked for m in mappings("self") if m.start <= k._addr < m.end)
            os._exit(0 if ok else 1)
        print(os.waitpid(pid, 0)[1])
    """)
    assert p.stdout.split() == ["0"], p.stdout + p.stderr
