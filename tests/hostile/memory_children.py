"""Holds memory in several children, each under the per-process limit, together far over it. Answers
correctly only if all of them got their memory."""
import os


def add(x: int, y: int):
    children = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            try:
                hoard = bytearray(400 << 20)
                for k in range(0, len(hoard), 4096):
                    hoard[k] = 1
                os.write(1, b"")
                import time
                time.sleep(3)
                os._exit(0)
            except MemoryError:
                os._exit(1)
        children.append(pid)
    ok = all(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0 for pid in children)
    return x + y if ok else None
