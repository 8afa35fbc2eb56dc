"""Allocates (and touches) memory without end."""


def add(x: int, y: int):
    hoard = []
    while True:
        hoard.append(bytearray(1 << 26))
