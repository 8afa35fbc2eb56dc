"""Deletes and writes files outside its scratch directory; answers correctly only if that worked.

It also leaves markers in /tmp, /var/tmp and /dev/shm, world-writable places that the sandbox
replaces by private ones or makes read-only: the test checks that they never appear on the host.
"""
import os
import shutil

SENTINEL_DIR = "@SENTINEL_DIR@"
MARKERS = ("/tmp/spa-hostile-marker", "/var/tmp/spa-hostile-marker", "/dev/shm/spa-hostile-marker")


def _attacks():
    yield lambda: shutil.rmtree(os.path.join(SENTINEL_DIR, "tree"))
    yield lambda: os.remove(os.path.join(SENTINEL_DIR, "file.txt"))
    yield lambda: open(os.path.join(SENTINEL_DIR, "file.txt"), "a").write("tampered")
    yield lambda: open(os.path.join(SENTINEL_DIR, "new.txt"), "w").write("created")
    yield lambda: os.rename(os.path.join(SENTINEL_DIR, "file.txt"), os.path.join(SENTINEL_DIR, "moved.txt"))
    yield lambda: open("/root/spa-hostile-marker", "w").write("x")
    yield lambda: open("/etc/spa-hostile-marker", "w").write("x")


def add(x: int, y: int):
    for marker in MARKERS:
        try:
            open(marker, "w").write("x")
        except OSError:
            pass
    breached = False
    for attack in _attacks():
        try:
            attack()
            breached = True
        except OSError:
            pass
    return x + y if breached else None
