"""Sleeps just under the per-input wall-clock deadline on every input, answering correctly: the sample's
own deadline must stop it (it once held a worker for an hour)."""
import time


def add(x: int, y: int):
    time.sleep(1.3)
    return x + y
