"""The search plan (store/plan.py) in Qdrant Edge's types, and run on a shard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import qdrant_edge as qe

from imagesearch.store import plan
from imagesearch.store.layout import ATTRIBUTE_PAIRS

# attribute_pairs is only ever matched, never read back (the `attributes` map is); skip converting it per hit.
HIT_PAYLOAD = qe.PayloadSelector.Exclude([ATTRIBUTE_PAIRS])
T = TypeVar("T")
U = TypeVar("U")

_DECAY = {"lin": qe.DecayKind.Lin, "gauss": qe.DecayKind.Gauss, "exp": qe.DecayKind.Exp}


def edge_filter(flt: plan.Filter | None) -> qe.Filter | None:
    return None if flt is None else _filter(flt)


def _filter(flt: plan.Filter) -> qe.Filter:
    return qe.Filter(
        must=[_condition(c) for c in flt.must] or None, must_not=[_condition(c) for c in flt.must_not] or None
    )


def _condition(c: plan.Condition) -> qe.ConditionType:
    match c:
        case plan.MatchAny(key, values):
            return qe.FieldCondition(key, match=qe.MatchAny(list(values)))
        case plan.MatchValue(key, value):
            return qe.FieldCondition(key, match=qe.MatchValue(value))
        case plan.Range(key, gte, lte):
            return qe.FieldCondition(key, range=qe.RangeFloat(gte=gte, lte=lte))
        case plan.HasId(point_ids):
            return qe.HasIdCondition(set(point_ids))
        case plan.HasVector(name):
            return qe.HasVectorCondition(name)
        case plan.IsEmpty(key):
            return qe.IsEmptyCondition(key)
        case plan.Filter():
            return _filter(c)
    raise TypeError(f"not a filter condition: {c!r}")


def edge_expression(x: plan.Expression) -> qe.Expression:
    e = qe.Expression
    match x:
        case plan.Constant(value):
            return e.Constant(value)
        case plan.Variable(name):
            return e.Variable(name)
        case plan.Sum(terms):
            return e.Sum([edge_expression(t) for t in terms])
        case plan.Mult(factors):
            return e.Mult([edge_expression(f) for f in factors])
        case plan.Max(operands):
            return e.Max([edge_expression(o) for o in operands])
        case plan.Ln(x_):
            return e.Ln(edge_expression(x_))
        case plan.Matches(flt):
            return e.Condition(_condition(flt))
        case plan.Decay(kind, x_, target, scale, midpoint):
            target_ = None if target is None else edge_expression(target)
            return e.Decay(_DECAY[kind], edge_expression(x_), target=target_, midpoint=midpoint, scale=scale)
    raise TypeError(f"not a formula expression: {x!r}")


def edge_query(q: plan.Query) -> qe.ScoringQueryType:
    if isinstance(q, plan.Rrf):
        # The stubs type Fusion.Rrf as a class of its own rather than as a Fusion.
        return cast("qe.ScoringQueryType", qe.Fusion.Rrf(q.k))
    if isinstance(q, plan.Formula):
        return qe.Formula(edge_expression(q.expression), defaults=dict(q.defaults))
    return qe.Query.Nearest(q.vector, using=q.using or None)  # the unnamed vector is the default one


def edge_request(r: plan.Request) -> qe.QueryRequest:
    # What the plan repeats (every leaf's filter, a prefetch nested in another) is converted once per request.
    converted: dict[int, Any] = {}

    def once(item: T, convert: Callable[[T], U]) -> U:
        if id(item) not in converted:
            converted[id(item)] = convert(item)
        return cast(U, converted[id(item)])

    def prefetch(p: plan.Prefetch) -> qe.Prefetch:
        nested = [once(n, prefetch) for n in p.prefetches] or None
        flt = once(p.filter, edge_filter)
        query = edge_query(p.query)
        return qe.Prefetch(limit=p.limit, query=query, prefetches=nested, filter=flt, score_threshold=p.score_threshold)

    return qe.QueryRequest(
        limit=r.limit,
        offset=r.offset,
        query=edge_query(r.query),
        prefetches=[once(p, prefetch) for p in r.prefetches] or None,
        filter=once(r.filter, edge_filter),
        with_payload=HIT_PAYLOAD if r.with_payload else False,
        with_vector=list(r.with_vectors) if r.with_vectors else False,
        score_threshold=r.score_threshold,
    )
