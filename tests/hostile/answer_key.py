"""Looks for the answer key on disk: the datasets, the ground-truth cache, the project tree, the host's
files. Answers correctly only if it could read any of them."""
import os

PLACES = ["@DATA_DIR@", "@PROJECT_DIR@/README.md", "@PROJECT_DIR@/eval", "@PROJECT_DIR@/results/cache/groundtruth",
          "/etc/passwd", "/etc/hostname", "/var/tmp", "/home"]


def add(x: int, y: int):
    for place in PLACES:
        try:
            if os.path.isdir(place):
                if os.listdir(place):
                    return x + y
            else:
                with open(place, "rb") as f:
                    if f.read(1):
                        return x + y
        except OSError:
            pass
    return None
