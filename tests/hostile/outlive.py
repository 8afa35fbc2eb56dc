"""Leaves a detached grandchild behind (new session, double fork) that would keep running."""
import os
import time


def add(x: int, y: int):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(60)
        os._exit(0)
    return None
