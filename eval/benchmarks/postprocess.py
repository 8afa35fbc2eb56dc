"""From a model's generation to the program EvalPlus executes (nothing is executed here).

As EvalPlus 0.3.1 does it (``codegen.py``, ``provider/hf.py``, ``sanitize.py``): the generation is
cut at the earliest stop string and its tabs become four spaces; a base model's program is the
prompt it completed plus the completion, an instruct model's is the code of its answer; the
program is then passed through EvalPlus's tree-sitter sanitizer.

The sanitizer has gaps that turn correct programs into wrong ones: it drops decorated functions
(``@lru_cache``), functions without ``return`` (helpers that fill a list, generators), tuple
assignments (``LO, HI = 1, 9``), ``+=``, top-level loops and ``try`` blocks that build what the
entry point uses, and ``sys.setrecursionlimit``. So the raw program is kept, and it is the solution
whenever the sanitized one lost something the entry point needs (README "Post-processing").
"""

from __future__ import annotations

import ast
import re
import symtable

from evalplus.sanitize import sanitize

from eval.errors import ConfigError
from eval.benchmarks.prompts import BuiltPrompt
from spa.text import truncate_at_stop

# A markdown fence line: ``` optionally followed by a language tag.
_FENCE = re.compile(r"^[ \t]*```[ \t]*(?P<lang>[\w+.-]*)[ \t]*$", re.MULTILINE)


def extract_code(response: str) -> str:
    """The code of a chat answer.

    The first fence line decides: one with a language tag, or with only blank text before it, opens
    a block, whose body is returned (up to the next fence, or to the end when unterminated); a bare
    fence after text closes the block the prompt's prefill opened, and the text before it is
    returned. Without any fence the whole response is code (the prefilled block, stopped before its
    closing fence, as EvalPlus's ``"\\n```\\n"`` stop string leaves it).
    """
    fences = list(_FENCE.finditer(response))
    if not fences:
        return response
    first = fences[0]
    before = response[: first.start()]
    if first.group("lang") or not before.strip():
        end = fences[1].start() if len(fences) > 1 else len(response)
        return response[first.end() : end].removeprefix("\n")
    return before


def to_solution(task: dict, benchmark: str, style: str, generated: str, built: BuiltPrompt) -> dict:
    """The program to execute for ``generated``, the decoded continuation of ``built.text``.

    Returns ``solution`` (the sanitized program, or the raw one where sanitizing broke it),
    ``raw_solution`` (the unsanitized program), ``sanitized_ok`` (whether ``solution`` is the sanitized
    program) and ``fallback_reason`` (why not, or None).
    """
    if (benchmark, style) != (built.benchmark, built.style):
        raise ConfigError(
            f"The generation is post-processed as {benchmark}/{style}, but its prompt was built as "
            f"{built.benchmark}/{built.style}; pass the BuiltPrompt the generation continued."
        )
    completion = truncate_at_stop(generated, built.stop_strings).replace("\t", "    ")
    raw = built.text + completion if style == "base" else extract_code(completion)
    return sanitized_solution(raw, task["entry_point"])


def sanitized_solution(raw: str, entry_point: str) -> dict:
    """``raw`` through EvalPlus's sanitizer, or ``raw`` itself where sanitizing lost code the entry point needs.

    Returns ``solution``, ``raw_solution``, ``sanitized_ok`` and ``fallback_reason`` (see :func:`to_solution`).
    """
    sanitized = sanitize(raw, entrypoint=entry_point)
    reason = sanitizer_damage(raw, sanitized, entry_point)
    return {
        "solution": sanitized if reason is None else raw,
        "raw_solution": raw,
        "sanitized_ok": reason is None,
        "fallback_reason": reason,
    }


def sanitizer_damage(raw: str, sanitized: str, entry_point: str) -> str | None:
    """Why ``sanitized`` lost top-level code of ``raw`` that ``entry_point`` needs; None if it did not.

    Needed code: every top-level statement that binds or mutates a module-level name the entry
    point reads (transitively: helpers of helpers, constants of helpers), the entry point's own
    definition, and ``sys.setrecursionlimit`` calls. A needed statement is lost when its source
    text is no longer in ``sanitized`` (the sanitizer copies statements verbatim).
    """
    try:
        statements = ast.parse(raw).body
        module_scope = symtable.symtable(raw, "<raw>", "exec")
    except SyntaxError:
        return None  # the sanitizer's longest parseable block is the only runnable program
    try:
        ast.parse(sanitized)
    except SyntaxError:
        return "the sanitized program does not parse, the raw one does"
    bound = [_bound_names(statement) for statement in statements]
    if not any(entry_point in names for names in bound):
        return None  # nothing to protect: the raw program does not define the entry point
    scopes = {(child.get_name(), child.get_lineno()): child for child in module_scope.get_children()}
    read = [_module_names_read(statement, scopes) for statement in statements]

    needed = {entry_point}
    grown = True
    while grown:
        grown = False
        for names_bound, names_read in zip(bound, read):
            if names_bound & needed and not names_read <= needed:
                needed |= names_read
                grown = True

    for statement, names_bound in zip(statements, bound):
        if (names_bound & needed or _sets_recursion_limit(statement)) and not all(
            segment in sanitized for segment in _source_segments(raw, statement)
        ):
            first_line = ast.get_source_segment(raw, statement).splitlines()[0]
            return f"the sanitizer dropped top-level code that {entry_point}() needs: {first_line!r}"
    return None


def _bound_names(statement: ast.stmt) -> set[str]:
    """Module-level names a top-level statement defines, assigns or mutates (``X.append``, ``X[k] =``)."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    names: set[str] = set()
    for node in ast.walk(statement):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Name, ast.Attribute, ast.Subscript)) and isinstance(node.ctx, ast.Store):
            names.add(_base_name(node))
        elif isinstance(node, ast.Expr) and isinstance(call := node.value, ast.Call):
            if isinstance(call.func, ast.Attribute):  # a method called for its effect: PRIMES.append(k)
                names.add(_base_name(call.func.value))
    names.discard("")
    return names


def _base_name(node: ast.expr) -> str:
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def _module_names_read(statement: ast.stmt, scopes: dict[tuple[str, int], symtable.SymbolTable]) -> set[str]:
    """Module-level names a top-level statement reads, inside function and class bodies included."""
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        # Decorators, defaults and bases run at module level; the body's globals come from symtable.
        outer = [*statement.decorator_list]
        if isinstance(statement, ast.ClassDef):
            outer += [*statement.bases, *(keyword.value for keyword in statement.keywords)]
        else:
            outer += [*statement.args.defaults, *(d for d in statement.args.kw_defaults if d is not None)]
        names = {node.id for part in outer for node in ast.walk(part) if isinstance(node, ast.Name)}
        return names | _scope_globals(scopes[(statement.name, statement.lineno)])
    return {node.id for node in ast.walk(statement) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}


def _scope_globals(scope: symtable.SymbolTable) -> set[str]:
    names = {
        symbol.get_name()
        for symbol in scope.get_symbols()
        if symbol.is_global() and (symbol.is_referenced() or symbol.is_declared_global())
    }
    for child in scope.get_children():
        names |= _scope_globals(child)
    return names


def _sets_recursion_limit(statement: ast.stmt) -> bool:
    if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)):
        return False
    func = statement.value.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name == "setrecursionlimit"


def _source_segments(raw: str, statement: ast.stmt) -> list[str]:
    """The statement's source and, for a decorated definition, each decorator's."""
    decorators = getattr(statement, "decorator_list", [])
    return [ast.get_source_segment(raw, node) for node in (statement, *decorators)]
