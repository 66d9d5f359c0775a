"""Domain code answers the same in every process: it never takes an order from a set.

A set (or frozenset) of strings iterates in an order that follows the per-process hash seed
(PYTHONHASHSEED), so a float sum, a list or a message built by iterating one can differ between two
processes given the same input. The drift score's Jensen-Shannon sum did (f433507: CI's batching test
failed under 2 of 12 seeds), and a planner transition must replay to the same commands. Membership,
size, any/all, min/max and sorted() do not depend on the order (a sort key must tell every element
apart: ties keep the set's order); anything else iterates sorted(...).

The check reads the source (ast): a set is a set literal or comprehension, a set()/frozenset() call,
a set operation on one, or a name or field that holds one (assigned or annotated so)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The pure layers (the same list mypy checks).
DOMAIN = ["services/planner/domain", "services/policy/domain", "services/observability/domain",
          "services/executor/domain", "services/memory/domain.py"]
pytestmark = pytest.mark.timeout(30)

# Consumers whose result does not depend on the order they are fed in.
ORDER_FREE = {"sorted", "set", "frozenset", "len", "any", "all", "min", "max", "isinstance"}
# Consumers that keep (or act on) the order they are fed in.
ORDERED = {"list", "tuple", "sum", "fsum", "enumerate", "zip", "map", "filter", "join", "iter", "next",
           "dict", "fromkeys", "Counter", "extend", "str", "repr", "reversed", "dumps"}
SET_OPS = (ast.BitOr, ast.BitAnd, ast.Sub, ast.BitXor)


def _names_set(annotation: ast.expr | None) -> bool:
    return annotation is not None and ast.unparse(annotation).startswith(("set", "frozenset", "AbstractSet"))


def _targets(node: ast.AST) -> list[tuple[ast.expr, ast.expr | None, ast.expr | None]]:
    """(target, value, annotation) of the names one statement binds."""
    if isinstance(node, ast.Assign):
        return [(t, node.value, None) for t in node.targets]
    if isinstance(node, ast.AnnAssign):
        return [(node.target, node.value, node.annotation)]
    if isinstance(node, ast.For | ast.AsyncFor | ast.comprehension):
        return [(node.target, None, None)]
    if isinstance(node, ast.arg):
        return [(ast.Name(node.arg), None, node.annotation)]
    return []


class _Scope:
    """Which expressions are sets in one function (or module): names bound to one here, else the
    enclosing scope's; fields assigned or annotated as one in any class."""

    def __init__(self, nodes: list[ast.AST], outer: _Scope | None, fields: set[str]) -> None:
        self.outer, self.fields = outer, fields
        self.sets: set[str] = set()
        self.others: set[str] = set()
        for _round in range(2):  # a set made from another set's name
            for node in nodes:
                for target, value, annotation in _targets(node):
                    is_set = _names_set(annotation) or (value is not None and self.holds(value))
                    if isinstance(target, ast.Name):
                        (self.sets if is_set else self.others).add(target.id)
                    elif isinstance(target, ast.Attribute) and is_set:
                        fields.add(target.attr)
        self.others -= self.sets

    def holds(self, e: ast.expr) -> bool:
        if isinstance(e, ast.Set | ast.SetComp):
            return True
        if isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and e.func.id in ("set", "frozenset"):
            return True
        if isinstance(e, ast.BinOp) and isinstance(e.op, SET_OPS):
            return self.holds(e.left) or self.holds(e.right)
        if isinstance(e, ast.Name):
            if e.id in self.sets or e.id in self.others:
                return e.id in self.sets
            return self.outer is not None and self.outer.holds(e)
        return isinstance(e, ast.Attribute) and e.attr in self.fields


def _called(call: ast.Call) -> str:
    if isinstance(call.func, ast.Name):
        return call.func.id
    return call.func.attr if isinstance(call.func, ast.Attribute) else ""


def _ordered_in(nodes: list[ast.AST], scope: _Scope, parents: dict[ast.AST, ast.AST]) -> list[ast.expr]:
    """The set expressions these nodes take an order from."""
    found = []
    for node in nodes:
        iterated: list[ast.expr] = []
        if isinstance(node, ast.For | ast.AsyncFor):
            iterated = [node.iter]
        elif isinstance(node, ast.ListComp | ast.DictComp | ast.GeneratorExp):
            parent = parents.get(node)
            order_free = isinstance(parent, ast.Call) and _called(parent) in ORDER_FREE and \
                not any(k.arg == "key" for k in parent.keywords)
            iterated = [] if order_free else [g.iter for g in node.generators]
        elif isinstance(node, ast.Call) and _called(node) in ORDERED:
            iterated = [a.value if isinstance(a, ast.Starred) else a for a in node.args]
        elif isinstance(node, ast.Starred) and not isinstance(parents.get(node), ast.Call):
            iterated = [node.value]  # [*s] or (*s,)
        elif isinstance(node, ast.FormattedValue):
            iterated = [node.value]  # f"{s}" is its repr, in iteration order
        found += [e for e in iterated if scope.holds(e)]
    return found


def _own(node: ast.AST) -> list[ast.AST]:
    """The nodes of a module or function outside the functions it defines."""
    out, todo = [], list(ast.iter_child_nodes(node))
    while todo:
        child = todo.pop()
        out.append(child)
        if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            todo += ast.iter_child_nodes(child)
    return out


def ordered_uses(sources: dict[str, str]) -> list[str]:
    """``path:line: source`` of every place that takes an order from a set."""
    trees = {path: ast.parse(text) for path, text in sources.items()}
    literal = _Scope([], None, set())
    classes = [node for tree in trees.values() for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    fields = {stmt.target.id for cls in classes for stmt in cls.body
              if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
              and (_names_set(stmt.annotation) or (stmt.value is not None and literal.holds(stmt.value)))}
    # Module constants are imported by name: any module's set constant is a set everywhere.
    constants = _Scope([n for tree in trees.values() for n in tree.body], None, fields)
    found = []
    for path, tree in trees.items():
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        module = _Scope(list(tree.body), constants, fields)
        scopes: list[tuple[ast.AST, _Scope]] = [(tree, module)]
        while scopes:
            node, scope = scopes.pop()
            own = _own(node)
            found += [f"{path}:{e.lineno}: {ast.unparse(e)}" for e in _ordered_in(own, scope, parents)]
            for fn in own:
                if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                    args = [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs,
                            *filter(None, (fn.args.vararg, fn.args.kwarg))]
                    scopes.append((fn, _Scope([*args, *_own(fn)], scope, fields)))
    return sorted(set(found))


def _domain_sources() -> dict[str, str]:
    paths = [REPO / d for d in DOMAIN]
    files = [p for d in paths for p in ([d] if d.suffix == ".py" else sorted(d.rglob("*.py")))]
    return {str(p.relative_to(REPO)): p.read_text() for p in files}


def test_domain_code_never_takes_an_order_from_a_set() -> None:
    sources = _domain_sources()
    assert len(sources) >= 20, sorted(sources)  # the scan reads the domain modules
    found = ordered_uses(sources)
    assert not found, ("these iterate a set, whose order follows PYTHONHASHSEED; iterate sorted(...) "
                       "instead:\n" + "\n".join(found))


def test_the_check_finds_the_drift_sum_that_failed_in_ci() -> None:
    old_drift = """
def js(p, q):
    total = 0.0
    for key in set(p) | set(q):
        total += p.get(key, 0) - q.get(key, 0)
    return total
"""
    assert ordered_uses({"drift.py": old_drift}) == ["drift.py:4: set(p) | set(q)"]


@pytest.mark.parametrize("code", [
    "seen: set[str] = set()\ndef f(xs):\n    return [x for x in seen]",
    "TERMINAL = frozenset({'a', 'b'})\ndef f():\n    return ', '.join(TERMINAL)",
    "def f(xs):\n    both = {x.lower() for x in xs} & {'a'}\n    return f'{both} clash'",
    "class P:\n    fields: frozenset[str] = frozenset()\ndef f(p):\n    return sum(len(x) for x in p.fields)",
    "def f(a, b):\n    return tuple(set(a) - set(b))",
    "def f(s: set[str]):\n    return [*s]",
])
def test_the_check_finds_each_kind_of_ordered_use(code: str) -> None:
    assert len(ordered_uses({"m.py": code})) == 1, code


@pytest.mark.parametrize("code", [
    "def f(p, q):\n    return sum(p[k] for k in sorted(set(p) | set(q)))",
    "S = frozenset({'a'})\ndef f(x, xs):\n    return x in S and any(v in S for v in xs) and len(S)",
    "def f(xs):\n    seen = set(xs)\n    return {x.upper() for x in seen}, max(len(x) for x in seen)",
    "def f(xs):\n    return [x for x in xs if x]",
])
def test_the_check_lets_order_free_uses_pass(code: str) -> None:
    assert ordered_uses({"m.py": code}) == [], code
