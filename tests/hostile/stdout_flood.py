"""Floods stdout and stderr, through Python and through the raw file descriptors."""
import os
import sys


def add(x: int, y: int):
    chunk = "x" * 65536
    while True:
        print(chunk)
        sys.stderr.write(chunk)
        os.write(1, chunk.encode())
        os.write(2, chunk.encode())
