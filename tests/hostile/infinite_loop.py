"""Spins forever and swallows every exception, the executor's CPU-time alarm included."""


def add(x: int, y: int):
    while True:
        try:
            while True:
                pass
        except BaseException:
            pass
