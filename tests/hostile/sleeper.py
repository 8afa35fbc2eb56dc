"""Blocks without using CPU time: only the wall-clock backstop can end it."""
import time


def add(x: int, y: int):
    time.sleep(10**6)
