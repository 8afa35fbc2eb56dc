"""Lifts the recursion limit, then recurses through Python frames and through C (repr)."""
import sys


def add(x: int, y: int):
    sys.setrecursionlimit(10**9)

    def down(n):
        return down(n + 1) + 1

    try:
        down(0)
    except RecursionError:
        pass
    nested = []
    for _ in range(10**7):
        nested = [nested]
    return repr(nested)
