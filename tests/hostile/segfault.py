"""Dereferences a null pointer: the process dies of SIGSEGV."""
import ctypes


def add(x: int, y: int):
    ctypes.string_at(0)
    return x + y
