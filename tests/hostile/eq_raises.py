"""Returns an object whose comparison and repr raise."""


class Explosive:
    def __eq__(self, other):
        raise RuntimeError("eq")

    def __repr__(self):
        raise RuntimeError("repr")

    __str__ = __repr__


def add(x: int, y: int):
    return Explosive()
