"""Size expressions as polynomials, so the converter can compare `config.num_attention_heads * self.head_dim`
with `self.config.num_attention_heads * self.head_dim`, or tell that `qkv[..., a:b]` takes the k part.

An expression becomes a sum of monomials over atoms: any sub-expression that is not +, -, * or a
number (a name, an attribute, a call, a floor division of two sizes) is an atom, keyed by its code.
A resolver may replace a name or attribute by the expression it is bound to (a local, `self.x` of
__init__) before it becomes an atom, so both sides of a comparison reach the same atoms; `class_resolvers` builds them for a block's
__init__ and forward.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from fractions import Fraction

import libcst as cst

from porter.convert.cst_util import code, dotted, methods, self_attr, target_names

Monomial = tuple[str, ...]  # sorted atoms
# atom -> (numerator, denominator) of the floor divisions seen (`hidden_size // num_heads` as head size)
_FLOOR_DIVISIONS: dict[str, tuple["Size", "Size"]] = {}


class Size:
    """An immutable polynomial with rational coefficients over atoms."""

    def __init__(self, terms: dict[Monomial, Fraction] | None = None):
        self.terms = {m: c for m, c in (terms or {}).items() if c != 0}

    @staticmethod
    def const(n) -> Size:
        return Size({(): Fraction(n)})

    @staticmethod
    def atom(name: str) -> Size:
        return Size({(name,): Fraction(1)})

    def __add__(self, other: Size) -> Size:
        out = dict(self.terms)
        for m, c in other.terms.items():
            out[m] = out.get(m, Fraction(0)) + c
        return Size(out)

    def __neg__(self) -> Size:
        return Size({m: -c for m, c in self.terms.items()})

    def __sub__(self, other: Size) -> Size:
        return self + (-other)

    def __mul__(self, other: Size) -> Size:
        out: dict[Monomial, Fraction] = {}
        for m1, c1 in self.terms.items():
            for m2, c2 in other.terms.items():
                m = tuple(sorted(m1 + m2))
                out[m] = out.get(m, Fraction(0)) + c1 * c2
        return Size(out)

    def __eq__(self, other) -> bool:
        return isinstance(other, Size) and self.terms == other.terms

    def __hash__(self) -> int:
        return hash(frozenset(self.terms.items()))

    def scaled(self, factor: Fraction) -> Size:
        return Size({m: c * factor for m, c in self.terms.items()})

    def is_zero(self) -> bool:
        return not self.terms

    def over_atom(self, atom: Size) -> Size | None:
        """self / atom when every monomial holds that atom (heads * head_dim / head_dim), else None."""
        if len(atom.terms) != 1:
            return None
        (m, c), = atom.terms.items()
        if len(m) != 1:
            return None
        out: dict[Monomial, Fraction] = {}
        for mono, coef in self.terms.items():
            if m[0] not in mono:
                return None
            rest = list(mono)
            rest.remove(m[0])
            out[tuple(rest)] = coef / c
        return Size(out)

    def count_of(self, size: Size) -> Size | None:
        """How many `size`s make self: self / size for a single-atom size (`heads * head_dim` /
        `head_dim`), or B when size is the atom `A // B` and self is A (`hidden_size` over
        `hidden_size // num_heads` is `num_heads`, the file's own definition of its head size)."""
        quotient = self.over_atom(size)
        if quotient is not None:
            return quotient
        if len(size.terms) == 1:
            (mono, coef), = size.terms.items()
            if coef == 1 and len(mono) == 1 and mono[0] in _FLOOR_DIVISIONS:
                numerator, denominator = _FLOOR_DIVISIONS[mono[0]]
                if numerator == self:
                    return denominator
        return None

    def render(self) -> str | None:
        """Python code for the polynomial; None when a coefficient is not an integer."""
        if any(c.denominator != 1 for c in self.terms.values()):
            return None
        if not self.terms:
            return "0"
        parts = []
        for mono, c in sorted(self.terms.items(), key=lambda t: (-len(t[0]), t[0])):
            factors = [a if _is_simple(a) else f"({a})" for a in mono]
            if not factors:
                parts.append((c < 0, str(abs(c.numerator))))
                continue
            text = " * ".join(factors)
            parts.append((c < 0, text if abs(c) == 1 else f"{abs(c.numerator)} * {text}"))
        first_neg, first = parts[0]
        out = ("-" if first_neg else "") + first
        for neg, text in parts[1:]:
            out += (" - " if neg else " + ") + text
        return out

    def __repr__(self) -> str:
        return f"Size({self.render() or self.terms})"


def _is_simple(atom: str) -> bool:
    return atom.replace(".", "").replace("_", "").isalnum() or (atom.endswith(")") and "(" in atom and " " not in atom)


Resolver = Callable[[cst.BaseExpression], "cst.BaseExpression | None"]


def size_of(expr: cst.BaseExpression, resolve: Resolver | None = None, _depth: int = 0) -> Size | None:
    """The polynomial of a size expression; `resolve(node)` may return the expression a name or
    attribute stands for. None for what cannot be a size (strings, lists, ...)."""
    if _depth > 20:
        return None
    if isinstance(expr, cst.Integer):
        return Size.const(int(expr.value, 0))
    if isinstance(expr, cst.UnaryOperation) and isinstance(expr.operator, cst.Minus):
        inner = size_of(expr.expression, resolve, _depth + 1)
        return -inner if inner is not None else None
    if isinstance(expr, cst.BinaryOperation):
        left = size_of(expr.left, resolve, _depth + 1)
        right = size_of(expr.right, resolve, _depth + 1)
        if left is None or right is None:
            return None
        if isinstance(expr.operator, cst.Add):
            return left + right
        if isinstance(expr.operator, cst.Subtract):
            return left - right
        if isinstance(expr.operator, cst.Multiply):
            return left * right
        if isinstance(expr.operator, cst.FloorDivide):
            atom = f"({left.render()}) // ({right.render()})"
            _FLOOR_DIVISIONS[atom] = (left, right)
            return Size.atom(atom)
        return None
    if isinstance(expr, (cst.Name, cst.Attribute)) and dotted(expr) is not None:
        bound = resolve(expr) if resolve is not None else None
        resolved = size_of(bound, resolve, _depth + 1) if bound is not None else None
        if resolved is not None:
            return resolved
        if isinstance(expr, cst.Attribute) and resolve is not None:  # `self.config.x` with self.config = config
            base = resolve(expr.value)
            if base is not None and dotted(base) is not None:
                return size_of(expr.with_changes(value=base), resolve, _depth + 1)
        return Size.atom(dotted(expr))
    if isinstance(expr, cst.Call):
        return Size.atom("".join(code(expr).split()))
    return None


def _assigned(fn: cst.FunctionDef) -> tuple[Counter, dict[str, cst.BaseExpression]]:
    """How often each name and `self.attr` is assigned in fn (anywhere), and the value of plain
    single-target assignments (`x = v`, `self.x = v`), keyed "x" / "self.x"."""
    counts: Counter = Counter()
    values: dict[str, cst.BaseExpression] = {}

    class V(cst.CSTVisitor):
        def _target(self, t, value):
            names = target_names(t)
            keys = names if names is not None else ([f"self.{self_attr(t)}"] if self_attr(t) else [])
            for k in keys:
                counts[k] += 1
                if value is not None and (isinstance(t, cst.Name) or self_attr(t)):
                    values[k] = value

        def visit_Assign(self, n):
            for t in n.targets:
                self._target(t.target, n.value if len(n.targets) == 1 else None)

        def visit_AugAssign(self, n):
            self._target(n.target, None)

        def visit_AnnAssign(self, n):
            self._target(n.target, n.value)

        def visit_For(self, n):
            self._target(n.target, None)

    fn.visit(V())
    return counts, values


def class_resolvers(cls: cst.ClassDef):
    """Size resolvers for __init__ and forward expressions: a name or `self.attr` assigned once stands
    for its value (`self.config` -> `config`, `q_pos` -> `self.config.num_attention_heads * self.head_dim`)."""
    ms = methods(cls)
    init_counts, init_values = _assigned(ms["__init__"])
    fwd_counts, fwd_values = _assigned(ms["forward"])

    def make(scopes):
        def resolve(node):
            key = f"self.{self_attr(node)}" if self_attr(node) else node.value if isinstance(node, cst.Name) else None
            if key is None:
                return None
            if key.startswith("self."):
                return init_values.get(key) if init_counts[key] == 1 and fwd_counts[key] == 0 else None
            for counts, values in scopes:
                if counts[key]:
                    return values.get(key) if counts[key] == 1 else None
            return None
        return resolve

    return make([(init_counts, init_values)]), make([(fwd_counts, fwd_values), (init_counts, init_values)])
