"""The judge: turns the bytes a sandboxed program sent into a verdict, outside the sandbox.

It runs in the harness, which never executes untrusted code. An output arrives as ``marshal`` bytes (see
``eval.execution.child``); the judge never hands them to ``marshal.loads``, which is not safe on malicious
data, but to :func:`parse_plain`, a small pure-Python reader of the plain-data subset of marshal version 2
(None, bools, ints, floats, complex, str, bytes, tuples, lists, dicts, sets, frozensets) that builds only
those exact types, refuses everything else (code objects, references, unknown codes, trailing bytes,
overlong lengths) and has no recursion to exhaust. Any oddity is a fail, never a pass.

An output whose digest equals the canonical output's digest passes (exact, typed equality); otherwise both
are parsed and EvalPlus 0.3.1's comparison runs on the plain values, with its special oracles.
"""

from __future__ import annotations

import struct
from hashlib import blake2b

MAX_DEPTH = 10_000
# Outputs larger than this that differ from the expected bytes are not parsed (pure Python would take
# minutes): they fail. MBPP+ has canonical outputs of up to 1 GB (Mbpp/255), all compared exactly by EvalPlus.
PARSE_LIMIT = 64 << 20


class MalformedOutput(ValueError):
    """The bytes are not plain data in marshal version 2."""


def hasher():
    return blake2b(digest_size=16)


def digest(data: bytes) -> str:
    return blake2b(data, digest_size=16).hexdigest()


def parse_plain(data: bytes):
    """The plain value encoded by ``data`` (marshal version 2); MalformedOutput for anything else."""
    view = memoryview(data)
    end = len(view)
    pos = 0

    def take(n: int) -> memoryview:
        nonlocal pos
        if n < 0 or pos + n > end:
            raise MalformedOutput("truncated or overlong field")
        pos += n
        return view[pos - n:pos]

    def count() -> int:
        n = struct.unpack("<i", take(4))[0]
        if n < 0 or n > end - pos:  # every element takes at least one byte
            raise MalformedOutput(f"bad length {n}")
        return n

    stack: list[list] = []  # containers being filled: [type code, items, size (None: a dict, up to NULL)]
    while True:
        code = take(1)[0]
        if code & 0x80:
            raise MalformedOutput("references are not plain data")
        if code in _CONTAINERS:
            frame = [code, [], count() if code != 0x7B else None]
            if frame[2] != 0:
                if len(stack) >= MAX_DEPTH:
                    raise MalformedOutput("nested too deeply")
                stack.append(frame)
                continue
            value = _build(frame)
        elif code == 0x30 and stack and stack[-1][2] is None and len(stack[-1][1]) % 2 == 0:  # end of a dict
            value = _build(stack.pop())
        elif code == 0x4E:  # N
            value = None
        elif code == 0x46:  # F
            value = False
        elif code == 0x54:  # T
            value = True
        elif code == 0x69:  # i: int32
            value = struct.unpack("<i", take(4))[0]
        elif code == 0x6C:  # l: an int as 15-bit digits, least significant first
            n = struct.unpack("<i", take(4))[0]
            size = abs(n)
            if size > (end - pos) // 2:
                raise MalformedOutput("bad int length")
            digits = struct.unpack(f"<{size}H", take(2 * size))
            if size and (max(digits) >= 1 << 15 or digits[-1] == 0):
                raise MalformedOutput("bad int digit")
            value = -_from_digits(digits) if n < 0 else _from_digits(digits)
        elif code == 0x67:  # g: binary float
            value = struct.unpack("<d", take(8))[0]
        elif code == 0x79:  # y: binary complex
            value = complex(*struct.unpack("<dd", take(16)))
        elif code == 0x73:  # s: bytes
            value = bytes(take(count()))
        elif code == 0x75:  # u: str, utf-8 with surrogatepass
            try:
                value = str(take(count()), "utf-8", "surrogatepass")
            except UnicodeDecodeError as exc:
                raise MalformedOutput("bad utf-8") from exc
        else:
            raise MalformedOutput(f"type code {code:#x} is not plain data")
        while stack:  # hand the value to its container, closing every container it completes
            top = stack[-1]
            top[1].append(value)
            if len(top[1]) != top[2]:
                break
            value = _build(stack.pop())
        if not stack:
            break
    if pos != end:
        raise MalformedOutput("trailing bytes")
    return value


_CONTAINERS = frozenset({0x28, 0x5B, 0x3C, 0x3E, 0x7B})  # ( tuple, [ list, < set, > frozenset, { dict


def _build(frame: list):
    code, items, _ = frame
    try:
        if code == 0x28:
            return tuple(items)
        if code == 0x5B:
            return items
        if code == 0x3C:
            return set(items)
        if code == 0x3E:
            return frozenset(items)
        return dict(zip(items[0::2], items[1::2]))
    except TypeError as exc:  # an unhashable key: lists inside a set or as dict keys
        raise MalformedOutput(str(exc)) from exc


def _from_digits(digits) -> int:
    """sum(d * 2**(15 k)): by halves, so that a huge int costs O(n log n), not O(n^2)."""
    if len(digits) <= 64:
        value = 0
        for d in reversed(digits):
            value = (value << 15) | d
        return value
    half = len(digits) // 2
    return (_from_digits(digits[half:]) << (15 * half)) | _from_digits(digits[:half])


# EvalPlus's comparison -----------------------------------------------------------------------

ORACLES_READING_INPUT = frozenset({"surface_area", "digit_distance", "poly_root"})


def judge(data, expected_digest: str, expected_blob, args, oracle: str | None, atol: float, oracle_module) -> str | None:
    """None when the output ``data`` passes, else the reason it fails.

    ``data`` is the output's bytes, or (over PARSE_LIMIT, not kept) an object with ``digest()`` and ``size``.
    ``expected_blob()`` gives the canonical output's (zlib-compressed) bytes, read only when the digests
    differ; ``args`` is the pristine input (the oracles that read it never see the program's mutations).
    """
    if oracle == "always":
        return None
    if not isinstance(data, bytes):
        if data.digest() == expected_digest:
            return None
        return f"the output ({data.size >> 20} MiB) differs from the expected one (outputs this large are compared exactly)"
    if oracle != "poly_root" and digest(data) == expected_digest:
        return None
    try:
        out = parse_plain(data)
    except MalformedOutput as exc:
        return f"the output could not be read as plain data ({exc})"
    expected = None
    if oracle != "poly_root":
        import zlib

        expected = parse_plain(zlib.decompress(expected_blob()))
    try:
        return compare(out, expected, args, oracle, atol, oracle_module)
    except Exception as exc:  # e.g. set() of unhashable elements, arithmetic on a string, deep recursion
        return f"the comparison raised {type(exc).__name__}: expected {short(expected)}, got {short(out)}"


def compare(out, expected, args, oracle, atol, oracle_module) -> str | None:
    """EvalPlus 0.3.1's check (``evalplus.eval.unsafe_execute``) on plain values; None when it passes.

    Deviations: the find_zero oracle passes when ``|poly(xs, out)| <= atol`` (0.3.1 ``continue``s before
    recording the pass, so it fails every sample, the canonical solution included; fixed upstream after
    the release); oracles read the input as given, not as mutated by the program; and the float tolerance
    EvalPlus enables on a float output stays scoped to that input (in 0.3.1 it leaks to the following
    inputs, which changes no verdict for plain values).
    """
    if oracle == "poly_root":  # HumanEval/32
        value = abs(oracle_module._poly(*args, out))
        return None if value <= atol else f"|poly(xs, {short(out)})| = {value:.3g} > {atol}"
    exact = out == expected
    if oracle == "set_eq":
        exact = set(out) == set(expected)
    elif oracle == "or_zero":  # Mbpp/295
        exact = exact or out == 0
    elif oracle == "surface_area":  # Mbpp/581
        exact = exact or abs(out - oracle_module._surface_Area(*args)) <= atol
    elif oracle == "digit_distance":  # Mbpp/558
        exact = exact or out == oracle_module._digit_distance_nums(*args)
    if atol == 0 and _is_floats(expected):
        atol = 1e-6
    if exact or atol == 0:
        return None if exact else f"expected {short(expected)}, got {short(out)}"
    if type(out) is not type(expected):
        return f"expected {short(expected)}, got {short(out)} (type {type(out).__name__})"
    if isinstance(expected, (list, tuple)) and len(out) != len(expected):
        return f"expected {len(expected)} items, got {len(out)}"
    if _allclose(out, expected, atol):
        return None
    return f"expected {short(expected)} within atol={atol}, got {short(out)}"


def _is_floats(x) -> bool:
    """``evalplus.eval.is_floats`` for plain values."""
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    return False


def _allclose(out, expected, atol: float, rtol: float = 1e-07) -> bool:
    """``numpy.allclose(out, expected, rtol=1e-07, atol=atol)`` for plain values.

    Like numpy: elementwise over equally shaped (nested) sequences of numbers, NaN never close,
    infinities close only to themselves, anything non-numeric not comparable (numpy raises, which
    EvalPlus counts as a failure). Unlike numpy, shapes must match exactly (no broadcasting).
    """
    if isinstance(out, (list, tuple)) or isinstance(expected, (list, tuple)):
        if not (isinstance(out, (list, tuple)) and isinstance(expected, (list, tuple))):
            return False
        return len(out) == len(expected) and all(_allclose(a, b, atol, rtol) for a, b in zip(out, expected))
    numbers = (bool, int, float, complex)
    if not (isinstance(out, numbers) and isinstance(expected, numbers)):
        return False
    if out != out or expected != expected:
        return False
    if abs(out) == float("inf") or abs(expected) == float("inf"):
        return out == expected
    return abs(out - expected) <= atol + rtol * abs(expected)


def short(value, limit: int = 120) -> str:
    """A bounded repr of a plain value (huge ints and strings are not converted in full)."""
    if type(value) is int and value.bit_length() > 256:
        return f"<int of {value.bit_length()} bits>"
    if type(value) in (str, bytes) and len(value) > limit:
        return repr(value[:limit]) + f"...(+{len(value) - limit})"
    if type(value) in (list, tuple, set, frozenset, dict) and len(value) > 8:
        items = list(value.items() if type(value) is dict else value)[:8]
        return f"{type(value).__name__} of {len(value)} items starting {short(items, limit)}"
    if type(value) in (list, tuple, set, frozenset, dict):
        parts = [short(v, limit // 2) for v in (value.items() if type(value) is dict else value)]
        text = ", ".join(parts)
        text = {list: "[{}]", tuple: "({})", set: "{{{}}}", frozenset: "frozenset({{{}}})", dict: "dict({})"}[
            type(value)
        ].format(text)
    else:
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
