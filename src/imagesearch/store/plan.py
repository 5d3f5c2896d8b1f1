"""The search plan's vocabulary: what one search asks of the engine, in terms neither client library owns.

Filters, formulas and requests are small trees: each backend compiles them to its client's types (edge_plan.py,
qdrant_plan.py), neither decides them. The algorithm that yields the requests is store/search_plan.py. `evaluate`
computes a formula in Python by the engine's own definitions, so that a score explanation comes from the same tree
the engine ranks by.

The records are NamedTuples, cheap to build on every search. Being tuples, two of different kinds can compare
equal (Sum((x,)) == Mult((x,))): tell them apart by type, as the compilers do.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any, Literal, NamedTuple, Protocol

import qdrant_edge as qe

from imagesearch.domain import SearchFilter, point_id_for
from imagesearch.store.layout import ATTRIBUTE_PAIRS, CATEGORY, DENSE_VECTOR, PRICE, attribute_pair

# --- filters: every condition of `must` holds and none of `must_not` --------------------------------------------


class MatchAny(NamedTuple):  # the keyword field holds any of the values
    key: str
    values: tuple[str, ...]


class MatchValue(NamedTuple):  # the keyword field holds the value
    key: str
    value: str


class Range(NamedTuple):  # the numeric field lies within the inclusive bounds (None: unbounded)
    key: str
    gte: float | None
    lte: float | None


class HasId(NamedTuple):  # the point is one of these
    point_ids: frozenset[str]


class HasVector(NamedTuple):  # the point has this named vector
    name: str


class IsEmpty(NamedTuple):  # the field is missing, null or an empty list
    key: str


class Filter(NamedTuple):
    must: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()


Condition = MatchAny | MatchValue | Range | HasId | HasVector | IsEmpty | Filter


def search_filter(flt: SearchFilter, exclude_ids: Collection[str] = ()) -> Filter | None:
    """The filter of a search or listing: `flt` over the payload, minus the products in `exclude_ids`."""
    must: list[Condition] = []
    if flt.categories:
        must.append(MatchAny(CATEGORY, tuple(flt.categories)))
    if flt.price_min is not None or flt.price_max is not None:
        must.append(Range(PRICE, flt.price_min, flt.price_max))
    must.extend(MatchValue(ATTRIBUTE_PAIRS, attribute_pair(key, value)) for key, value in flt.attributes)
    must_not = (HasId(frozenset(point_id_for(pid) for pid in exclude_ids)),) if exclude_ids else ()
    return Filter(tuple(must), must_not) if must or must_not else None


# --- formulas: a score computed per point ---------------------------------------------------------------------


class Constant(NamedTuple):
    value: float


class Variable(NamedTuple):  # a prefetch's score ("$score[i]": the i-th prefetch) or a numeric payload field
    name: str


class Sum(NamedTuple):
    terms: tuple[Expression, ...]


class Mult(NamedTuple):
    factors: tuple[Expression, ...]


class Max(NamedTuple):
    operands: tuple[Expression, ...]


class Ln(NamedTuple):  # the natural logarithm
    x: Expression


class Matches(NamedTuple):  # 1 where the point matches the filter, else 0: a boost or a bury by filter
    filter: Filter


class Decay(NamedTuple):
    """Qdrant's decay of `x` away from `target`: 1 at the target, `midpoint` at `scale` from it (lin: linear down to
    0; gauss, exp: those curves). None leaves the engine's default (target 0, scale 1, midpoint 0.5)."""

    kind: Literal["lin", "gauss", "exp"]
    x: Expression
    target: Expression | None = None
    scale: float | None = None
    midpoint: float | None = None


Expression = Constant | Variable | Sum | Mult | Max | Ln | Matches | Decay


class Formula(NamedTuple):
    """The score of `expression`; a variable a point lacks (a prefetch it is not in, a missing field) takes its
    value in `defaults`."""

    expression: Expression
    defaults: Mapping[str, float]


# --- requests -------------------------------------------------------------------------------------------------

#: What a leaf matches: a dense vector, a multivector (several per point, MaxSim) or the sparse terms of a text
#: (layout.lexical_terms: the one BM25 model both backends share).
QueryVector = list[float] | list[list[float]] | qe.SparseVector


class Nearest(NamedTuple):
    """The points nearest `vector` on the named vector `using` (a multivector: by MaxSim, the sum over the query's
    rows of each row's best cosine)."""

    vector: QueryVector
    using: str = DENSE_VECTOR


class Rrf(NamedTuple):
    """Reciprocal rank fusion of the prefetches' rankings."""

    k: int


Query = Nearest | Rrf | Formula


class Prefetch(NamedTuple):
    """The `limit` best points by `query` among those matching `filter` (of the nested prefetches', if any) that
    score above `score_threshold`."""

    query: Query
    limit: int
    filter: Filter | None = None
    prefetches: tuple[Prefetch, ...] = ()
    score_threshold: float | None = None


class Request(NamedTuple):
    """One engine query. `with_payload`: the product payload (without ATTRIBUTE_PAIRS, which is only ever
    matched, never read back); `with_vectors`: the named vectors to return."""

    query: Query
    limit: int
    offset: int = 0
    prefetches: tuple[Prefetch, ...] = ()
    filter: Filter | None = None
    score_threshold: float | None = None
    with_payload: bool = True
    with_vectors: tuple[str, ...] = ()


class PointRecord(Protocol):
    """A point as either client's scroll or retrieve returns it (`vector`: those asked for)."""

    @property
    def id(self) -> Any: ...

    @property
    def payload(self) -> dict[str, Any] | None: ...

    @property
    def vector(self) -> Any: ...


class ScoredPoint(PointRecord, Protocol):
    """A point as either client's query returns it."""

    @property
    def score(self) -> float: ...


# --- formulas evaluated in Python -----------------------------------------------------------------------------

#: Qdrant's decay defaults: target 0, scale 1, midpoint 0.5.
_DECAY_DEFAULTS = (0.0, 1.0, 0.5)


def evaluate(
    x: Expression,
    variables: Mapping[str, float],
    payload: Mapping[str, Any],
    point_id: str | None = None,
    vectors: Collection[str] = (),
) -> float:
    """`x` for one point, by the engine's definitions: `variables` holds the prefetch scores ("$score[i]") and the
    formula's defaults, `payload` the point's payload (a numeric field read by a Variable wins over its default),
    `point_id` and `vectors` (its named vectors) answer HasId and HasVector."""

    def value(e: Expression) -> float:
        match e:
            case Constant(constant):
                return float(constant)
            case Variable(name):
                return _variable(name, variables, payload)
            case Sum(terms):
                return math.fsum(value(t) for t in terms)
            case Mult(factors):
                return math.prod(value(f) for f in factors)
            case Max(operands):
                return max(value(o) for o in operands)
            case Ln(arg):
                return math.log(value(arg))
            case Matches(flt):
                return 1.0 if matches(flt, payload, point_id, vectors) else 0.0
            case Decay(kind, arg, target, scale, midpoint):
                t = _DECAY_DEFAULTS[0] if target is None else value(target)
                s = _DECAY_DEFAULTS[1] if scale is None else scale
                m = _DECAY_DEFAULTS[2] if midpoint is None else midpoint
                return _decay(kind, value(arg) - t, s, m)
        raise TypeError(f"not a formula expression: {e!r}")

    return value(x)


def _decay(kind: str, distance: float, scale: float, midpoint: float) -> float:
    # The definitions of Qdrant's lin_decay, exp_decay and gauss_decay.
    if kind == "lin":
        return max(0.0, 1.0 - (1.0 - midpoint) / scale * abs(distance))
    if kind == "exp":
        return math.exp(math.log(midpoint) / scale * abs(distance))
    return math.exp(math.log(midpoint) / scale**2 * distance**2)


def _variable(name: str, variables: Mapping[str, float], payload: Mapping[str, Any]) -> float:
    if name.startswith("$score"):
        return float(variables[name if name != "$score" else "$score[0]"])
    found = _field(payload, name)
    if isinstance(found, list):  # the engine reads an array's first value
        found = found[0] if found else None
    if isinstance(found, (int, float)) and not isinstance(found, bool):
        return float(found)
    if name in variables:
        return float(variables[name])
    raise ValueError(f"no number at {name!r} in the payload and no default for it")


def _field(payload: Mapping[str, Any], key: str) -> Any:
    found: Any = payload
    for part in key.split("."):
        if not isinstance(found, Mapping) or part not in found:
            return None
        found = found[part]
    return found


def matches(
    flt: Filter, payload: Mapping[str, Any], point_id: str | None = None, vectors: Collection[str] = ()
) -> bool:
    """Whether a point passes `flt`, by the engine's rules (a condition on a list holds when any element does)."""

    def holds(c: Condition) -> bool:
        match c:
            case Filter(must, must_not):
                return all(holds(m) for m in must) and not any(holds(n) for n in must_not)
            case HasId(point_ids):
                return point_id in point_ids
            case HasVector(name):
                return name in vectors
            case IsEmpty(key):
                return _field(payload, key) in (None, [])
        found = _field(payload, c.key)
        items = found if isinstance(found, list) else [found]
        match c:
            case MatchAny(_, values):
                return any(item in values for item in items)
            case MatchValue(_, wanted):
                return wanted in items
            case Range(_, gte, lte):
                return any(_in_range(item, gte, lte) for item in items)
        raise TypeError(f"not a filter condition: {c!r}")

    return holds(flt)


def _in_range(item: Any, gte: float | None, lte: float | None) -> bool:
    if not isinstance(item, (int, float)) or isinstance(item, bool):
        return False
    return (gte is None or item >= gte) and (lte is None or item <= lte)
