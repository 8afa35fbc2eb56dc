"""Writes fake 'passed' records on every file descriptor the executor might read, then answers
wrongly: forged records must not turn into a pass."""
import os


def add(x: int, y: int):
    for fd in range(3, 32):
        for phase in range(2):
            for index in range(64):
                for record in (f"J\t{phase}\t{index}\n", f"P\t{phase}\t{index}\t{'0' * 32}\n"):
                    try:
                        os.write(fd, record.encode())
                    except OSError:
                        pass
    return None
