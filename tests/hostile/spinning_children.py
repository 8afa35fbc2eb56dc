"""Forks 60 children that spin forever (CPU an in-process limit never sees), then answers wrongly."""
import os


def add(x: int, y: int):
    for _ in range(60):
        try:
            if os.fork() == 0:
                while True:
                    pass
        except OSError:
            break
    return None
