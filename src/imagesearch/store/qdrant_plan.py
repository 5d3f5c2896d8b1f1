"""The search plan (store/plan.py) in qdrant-client's types, and run on a collection."""

from __future__ import annotations

from typing import Any

import qdrant_edge as qe
from qdrant_client import AsyncQdrantClient, models

from imagesearch.store import plan
from imagesearch.store.layout import ATTRIBUTE_PAIRS

# attribute_pairs is only ever matched, never read back (the `attributes` map is).
HIT_PAYLOAD = models.PayloadSelectorExclude(exclude=[ATTRIBUTE_PAIRS])


def sparse(vector: qe.SparseVector) -> models.SparseVector:
    """Terms from the shared BM25 model (layout.lexical_terms, layout.lexical_document) as qdrant-client's vector."""
    return models.SparseVector(indices=list(vector.indices), values=list(vector.values))


def qdrant_filter(flt: plan.Filter | None) -> models.Filter | None:
    return None if flt is None else _filter(flt)


def _filter(flt: plan.Filter) -> models.Filter:
    must, must_not = [_condition(c) for c in flt.must], [_condition(c) for c in flt.must_not]
    return models.Filter(must=must or None, must_not=must_not or None)


def _condition(c: plan.Condition) -> models.Condition:
    match c:
        case plan.MatchAny(key, values):
            return models.FieldCondition(key=key, match=models.MatchAny(any=list(values)))
        case plan.MatchValue(key, value):
            return models.FieldCondition(key=key, match=models.MatchValue(value=value))
        case plan.Range(key, gte, lte):
            return models.FieldCondition(key=key, range=models.Range(gte=gte, lte=lte))
        case plan.HasId(point_ids):
            return models.HasIdCondition(has_id=sorted(point_ids))
        case plan.HasVector(name):
            return models.HasVectorCondition(has_vector=name)
        case plan.IsEmpty(key):
            return models.IsEmptyCondition(is_empty=models.PayloadField(key=key))
        case plan.Filter():
            return _filter(c)
    raise TypeError(f"not a filter condition: {c!r}")


def qdrant_expression(x: plan.Expression) -> models.Expression:
    # In qdrant-client's formulas a float is a constant, a string a variable and a condition is 1 or 0.
    match x:
        case plan.Constant(value):
            return float(value)
        case plan.Variable(name):
            return name
        case plan.Sum(terms):
            return models.SumExpression(sum=[qdrant_expression(t) for t in terms])
        case plan.Mult(factors):
            return models.MultExpression(mult=[qdrant_expression(f) for f in factors])
        case plan.Max(operands):
            return models.MaxExpression(max=[qdrant_expression(o) for o in operands])
        case plan.Ln(x_):
            return models.LnExpression(ln=qdrant_expression(x_))
        case plan.Matches(flt):
            return _condition(flt)
        case plan.Decay(kind, x_, target, scale, midpoint):
            params = models.DecayParamsExpression(
                x=qdrant_expression(x_),
                target=None if target is None else qdrant_expression(target),
                scale=scale,
                midpoint=midpoint,
            )
            if kind == "lin":
                return models.LinDecayExpression(lin_decay=params)
            if kind == "gauss":
                return models.GaussDecayExpression(gauss_decay=params)
            return models.ExpDecayExpression(exp_decay=params)
    raise TypeError(f"not a formula expression: {x!r}")


def qdrant_query(q: plan.Query) -> tuple[models.Query, str | None]:
    """The query and the vector it uses (None: the unnamed one, or none)."""
    if isinstance(q, plan.Rrf):
        return models.RrfQuery(rrf=models.Rrf(k=q.k)), None
    if isinstance(q, plan.Formula):
        return models.FormulaQuery(formula=qdrant_expression(q.expression), defaults=dict(q.defaults)), None
    vector: Any = sparse(q.vector) if isinstance(q.vector, qe.SparseVector) else q.vector
    return models.NearestQuery(nearest=vector), q.using or None


def _prefetch(p: plan.Prefetch) -> models.Prefetch:
    query, using = qdrant_query(p.query)
    nested = [_prefetch(n) for n in p.prefetches] or None
    return models.Prefetch(
        prefetch=nested,
        query=query,
        using=using,
        limit=p.limit,
        filter=qdrant_filter(p.filter),
        score_threshold=p.score_threshold,
    )


async def query_points(client: AsyncQdrantClient, collection: str, r: plan.Request) -> list[models.ScoredPoint]:
    """Run one plan request on `collection`."""
    query, using = qdrant_query(r.query)
    response = await client.query_points(
        collection,
        query=query,
        using=using,
        prefetch=[_prefetch(p) for p in r.prefetches] or None,
        query_filter=qdrant_filter(r.filter),
        limit=r.limit,
        offset=r.offset,
        score_threshold=r.score_threshold,
        with_payload=HIT_PAYLOAD if r.with_payload else False,
        with_vectors=list(r.with_vectors) if r.with_vectors else False,
    )
    return response.points
