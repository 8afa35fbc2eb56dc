"""Switches off the CPU-time signals an in-process limit would use, then spins."""
import signal


def add(x: int, y: int):
    for name in ("SIGPROF", "SIGXCPU", "SIGVTALRM", "SIGALRM"):
        try:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        except (OSError, ValueError):
            pass
    signal.setitimer(signal.ITIMER_PROF, 0, 0)
    while True:
        pass
