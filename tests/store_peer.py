"""Another host, for the store tests: a separate process with its own store
connection (its own RADOS client on RBD) that obeys one command per line.

    python store_peer.py local ROOT
    python store_peer.py rbd CONF POOL NAMESPACE CLIENT

Commands (stdin) and answers (stdout, one line each):
    lock NAME            -> "locked"      or "error CLASS MESSAGE"
    write NAME OFF BYTE  -> "written"     4 KiB of BYTE at OFF into the locked image
    flush NAME           -> "flushed"
    open NAME            -> "opened"      open for writing, no lock (a watch on RBD)
    count N              -> "counted V"   N catalog updates, each +1 on key "n"
    unlock NAME          -> "unlocked"
The answer to every command comes after its work, so a test waits on it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evscrypt.errors import EvscryptError  # noqa: E402


def make_store(argv):
    if argv[0] == "local":
        from evscrypt.store.local import LocalStore
        return LocalStore(Path(argv[1]))
    from evscrypt.store.rbd import RBDStore
    conf, pool, ns, client = argv[1:5]
    return RBDStore(pool, namespace=ns, client=client, conf=conf)


def increment(entries):
    return {"n": str(int(entries.get("n", b"0")) + 1).encode()}, ()


def main() -> None:
    store = make_store(sys.argv[1:])
    images = {}
    for line in sys.stdin:
        cmd, *args = line.split()
        try:
            if cmd == "lock":
                img = images.get(args[0]) or store.open(args[0], write=True)
                images[args[0]] = img
                img.lock(f"store_peer {' '.join(sys.argv[1:])}")
                out = "locked"
            elif cmd == "open":
                images[args[0]] = store.open(args[0], write=True)
                out = "opened"
            elif cmd == "write":
                images[args[0]].pwrite(bytes([int(args[2])]) * 4096, int(args[1]))
                out = "written"
            elif cmd == "flush":
                images[args[0]].flush()
                out = "flushed"
            elif cmd == "unlock":
                images[args[0]].unlock()
                out = "unlocked"
            elif cmd == "count":
                cat = store.catalog()
                v = 0
                for _ in range(int(args[0])):
                    v = cat.update(increment)
                out = f"counted {v}"
            else:
                out = f"error ValueError unknown command {cmd}"
        except EvscryptError as e:
            out = f"error {type(e).__name__} {e.message}"
        print(out, flush=True)


if __name__ == "__main__":
    main()
