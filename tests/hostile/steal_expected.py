"""Hunts for the expected outputs inside its own interpreter (the judge used to live there): digests and
expected values through gc and the stack frames, a patched ``marshal.loads``, a query record on fd 3 and a
read of fd 4. Answers correctly only if it found something that looks like an answer key."""
import gc
import marshal
import os
import sys

_original_loads = marshal.loads
marshal.loads = lambda data, *a: 1  # a judge that decodes expected values here would see 1


def _found_key() -> bool:
    for obj in gc.get_objects():
        if isinstance(obj, dict) and ("digests" in obj or "expected" in obj or "oracle_file" in obj):
            return True
    frame = sys._getframe()
    while frame is not None:
        if any(name in frame.f_locals for name in ("digest", "digests", "expected", "expected_blob")):
            return True
        frame = frame.f_back
    try:
        os.write(3, b"Q\t0\t0\n")
        os.set_blocking(4, False)
        return bool(os.read(4, 1 << 16))
    except OSError:
        return False


def add(x: int, y: int):
    return x + y if _found_key() else None
