"""`imagesearch evaluate`: offline relevance evaluation of a running server against a judgement list.

A judgement list grades products for queries (JSONL or CSV; `read_judgements`). Every query runs through the public
client under one or more variants: SearchQuery fields in proto3 JSON merged into every query, optionally on another
server (`parse_variant`). ir-measures (trec_eval behind it) scores each ranking: nDCG@10, RR and R@k per query,
averaged over the queries (the mean RR is MRR). Two variants are compared per query with a paired t-test.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import ir_measures
from google.protobuf import json_format
from ir_measures import RR, R, ScoredDoc, Success, nDCG

from imagesearch.client import ImageSearchClient
from imagesearch.judgements import EvalQuery, EvaluationError, Judgements
from imagesearch.v1 import image_search_service_pb2 as pb

NDCG_CUTOFF = 10
DEFAULT_RECALL_AT = (10, 100)
DEFAULT_CONCURRENCY = 4
# Fields the evaluation sets itself: the query (from the judgement list) and how deep each ranking is read.
RESERVED_FIELDS = ("text", "image_url", "top_k", "page_size", "page_token")


class QueryFailed(Exception):
    def __init__(self, variant: str, query_id: str, error: grpc.aio.AioRpcError) -> None:
        super().__init__(f"variant {variant!r}, query {query_id!r}: {error.code().name}: {error.details()}")
        self.code = error.code()


@dataclass(frozen=True)
class Variant:
    name: str
    # Merged into every query (SearchQuery.MergeFrom): set fields replace the server's defaults.
    fields: pb.SearchQuery
    # None: the evaluation's target.
    target: str | None = None


DEFAULT_VARIANT = Variant("default", pb.SearchQuery())


def parse_variant(spec: str) -> Variant:
    """NAME[@TARGET]=JSON or NAME[@TARGET]=@FILE, the JSON being SearchQuery fields in proto3 JSON."""
    head, sep, body = spec.partition("=")
    name, at, target = head.partition("@")
    name, target = name.strip(), target.strip()
    if not sep or not name or (at and not target):
        raise EvaluationError(f"variant {spec!r}: expected NAME[@TARGET]=JSON or NAME[@TARGET]=@FILE")
    if body.startswith("@"):
        try:
            body = Path(body[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise EvaluationError(f"variant {name!r}: cannot read {body[1:]!r}: {exc.strerror}") from None
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"variant {name!r}: not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise EvaluationError(f"variant {name!r}: expected a JSON object of SearchQuery fields")
    try:
        fields = json_format.ParseDict(value, pb.SearchQuery())
    except json_format.ParseError as exc:
        raise EvaluationError(f"variant {name!r}: not a SearchQuery: {exc}") from None
    reserved = [field.name for field, _ in fields.ListFields() if field.name in RESERVED_FIELDS]
    if reserved:
        raise EvaluationError(
            f"variant {name!r}: {reserved[0]} is set by the evaluation (the judged query, read to the deepest cutoff)"
        )
    return Variant(name, fields, target or None)


def measures(recall_at: Sequence[int]) -> list[ir_measures.Measure]:
    # RR has no cutoff: it is read over the whole ranking the evaluation asks for (the deepest cutoff).
    return [nDCG @ NDCG_CUTOFF, RR, *(R @ k for k in sorted(set(recall_at)))]


def depth(recall_at: Sequence[int]) -> int:
    return max(NDCG_CUTOFF, *recall_at)


@dataclass(frozen=True)
class VariantResult:
    variant: Variant
    target: str
    model: str
    # query id -> measure name -> value, for every query of the judgement list.
    per_query: Mapping[str, Mapping[str, float]]
    means: Mapping[str, float]
    without_relevant_hit: int


@dataclass(frozen=True)
class Comparison:
    baseline: str
    other: str
    # measure name -> mean of (other - baseline) over queries, and the paired t-test's p-value (None: undefined).
    difference: Mapping[str, float]
    p_value: Mapping[str, float | None]
    without_relevant_hit: int


@dataclass(frozen=True)
class Report:
    judgements: Judgements
    measures: tuple[str, ...]
    depth: int
    results: tuple[VariantResult, ...]

    def comparison(self) -> Comparison | None:
        if len(self.results) != 2:
            return None
        base, other = self.results
        return Comparison(
            base.variant.name,
            other.variant.name,
            {m: other.means[m] - base.means[m] for m in self.measures},
            {m: paired_p_value(base, other, m) for m in self.measures},
            other.without_relevant_hit - base.without_relevant_hit,
        )


async def evaluate(
    judgements: Judgements,
    variants: Sequence[Variant],
    *,
    target: str,
    recall_at: Sequence[int] = DEFAULT_RECALL_AT,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> Report:
    names = [variant.name for variant in variants]
    if not variants or len(set(names)) != len(names):
        raise EvaluationError(f"variants need distinct names, got {names}")
    if min(recall_at, default=0) < 1 or concurrency < 1:
        raise EvaluationError("recall cutoffs and concurrency must be at least 1")
    ranked_to = depth(recall_at)
    scored = measures(recall_at)
    results = []
    async with AsyncExitStack() as stack:
        clients: dict[str, tuple[ImageSearchClient, str]] = {}
        for variant in variants:
            address = variant.target or target
            if address not in clients:
                client = await stack.enter_async_context(ImageSearchClient(address))
                info = await client.service_info()
                if ranked_to > info.limits.max_top_k:
                    raise EvaluationError(
                        f"{address} returns at most {info.limits.max_top_k} results (max_top_k): "
                        f"the deepest cutoff, {ranked_to}, is beyond it"
                    )
                clients[address] = (client, info.model.name)
            client, model = clients[address]
            run = await run_variant(client, judgements, variant, depth=ranked_to, concurrency=concurrency)
            results.append(score(judgements, run, variant, scored, target=address, model=model))
    return Report(judgements, tuple(str(m) for m in scored), ranked_to, tuple(results))


async def run_variant(
    client: ImageSearchClient, judgements: Judgements, variant: Variant, *, depth: int, concurrency: int
) -> dict[str, list[str]]:
    """Each query's ranked product ids under `variant`."""
    slots = asyncio.Semaphore(concurrency)

    async def ranking(query: EvalQuery) -> list[str]:
        message = pb.SearchQuery(text=query.text, top_k=depth)
        message.MergeFrom(variant.fields)
        async with slots:
            image = query.image.read_bytes() if query.image is not None else None
            try:
                response = await client.search(image=image, **search_keywords(message))
            except grpc.aio.AioRpcError as exc:
                raise QueryFailed(variant.name, query.query_id, exc) from exc
        return [hit.product.id for hit in response.hits]

    tasks = [asyncio.create_task(ranking(query)) for query in judgements.queries]
    try:
        rankings = await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return {query.query_id: ids for query, ids in zip(judgements.queries, rankings, strict=True)}


def search_keywords(query: pb.SearchQuery) -> dict[str, Any]:
    """`query` as the keywords of `client.search` (which takes the filter as flat keywords)."""
    keywords: dict[str, Any] = {field.name: value for field, value in query.ListFields() if field.name != "filter"}
    if query.HasField("filter"):
        f = query.filter
        keywords.update(
            categories=list(f.categories),
            price_min=f.price_min if f.HasField("price_min") else None,
            price_max=f.price_max if f.HasField("price_max") else None,
            attributes=dict(f.attributes),
        )
    return keywords


def score(
    judgements: Judgements,
    run: Mapping[str, Sequence[str]],
    variant: Variant,
    scored: Sequence[ir_measures.Measure],
    *,
    target: str,
    model: str,
) -> VariantResult:
    # trec_eval orders a run by score and breaks ties by product id, not by position: a score from the rank keeps
    # the server's order, ties and all.
    docs = [ScoredDoc(qid, pid, float(len(ids) - rank)) for qid, ids in run.items() for rank, pid in enumerate(ids)]
    ranked_to = max((len(ids) for ids in run.values()), default=1)
    found = Success @ max(ranked_to, 1)  # 1 when a relevant product is anywhere in the ranking
    per_query: dict[str, dict[str, float]] = {query.query_id: {} for query in judgements.queries}
    hits: dict[str, float] = {}
    for metric in ir_measures.iter_calc([*scored, found], judgements.qrels(), docs):
        if metric.measure == found:
            hits[metric.query_id] = metric.value
        else:
            per_query[metric.query_id][str(metric.measure)] = metric.value
    names = [str(m) for m in scored]
    for values in per_query.values():
        for name in names:
            values.setdefault(name, 0.0)  # a query with no hits at all
    means = {name: statistics.fmean(values[name] for values in per_query.values()) for name in names}
    missed = sum(1 for query_id in per_query if not hits.get(query_id))
    return VariantResult(variant, target, model, per_query, means, missed)


def paired_p_value(base: VariantResult, other: VariantResult, measure: str) -> float | None:
    """Two-sided paired t-test over queries (scipy's ttest_rel); None where every query moved by the same amount
    (no variance: the test is undefined)."""
    from scipy import stats

    a = [base.per_query[q][measure] for q in base.per_query]
    b = [other.per_query[q][measure] for q in base.per_query]
    differences = [y - x for x, y in zip(a, b, strict=True)]
    if len(differences) < 2 or max(differences) - min(differences) < 1e-12:
        return None
    p = float(stats.ttest_rel(b, a).pvalue)
    return None if math.isnan(p) else p


def report_json(report: Report) -> dict[str, Any]:
    comparison = report.comparison()
    return {
        "judgements": str(report.judgements.path),
        "queries": len(report.judgements.queries),
        "judged_products": report.judgements.count,
        "depth": report.depth,
        "measures": list(report.measures),
        "variants": [
            {
                "name": r.variant.name,
                "target": r.target,
                "model": r.model,
                "query": json_format.MessageToDict(r.variant.fields),
                "metrics": dict(r.means),
                "queries_without_relevant_hit": r.without_relevant_hit,
                "per_query": {q: dict(values) for q, values in r.per_query.items()},
            }
            for r in report.results
        ],
        "comparison": None
        if comparison is None
        else {
            "baseline": comparison.baseline,
            "variant": comparison.other,
            "difference": dict(comparison.difference),
            "p_value": dict(comparison.p_value),
            "test": "paired t-test over queries, two-sided (scipy.stats.ttest_rel)",
            "queries_without_relevant_hit": comparison.without_relevant_hit,
        },
    }


def format_report(report: Report) -> str:
    judgements = report.judgements
    lines = [
        f"{judgements.path}: {len(judgements.queries)} queries, {judgements.count} judged products; "
        f"rankings read to {report.depth} results"
    ]
    width = max(len(r.variant.name) for r in report.results)
    for r in report.results:
        fields = json.dumps(json_format.MessageToDict(r.variant.fields))
        lines.append(f"  {r.variant.name:<{width}}  {r.target}  model {r.model}  {fields}")
    label, column = 32, max(10, width + 2)
    comparison = report.comparison()
    header = f"{'':<{label}}" + "".join(f"{r.variant.name:>{column}}" for r in report.results)
    if comparison is not None:
        header += f"{'difference':>12}{'p (paired t)':>14}"
    lines += ["", header]
    for measure in report.measures:
        row = f"{_measure_label(measure):<{label}}"
        row += "".join(f"{r.means[measure]:>{column}.3f}" for r in report.results)
        if comparison is not None:
            row += f"{comparison.difference[measure]:>+12.3f}{_p(comparison.p_value[measure]):>14}"
        lines.append(row)
    row = f"{'queries without a relevant hit':<{label}}"
    row += "".join(f"{r.without_relevant_hit:>{column}}" for r in report.results)
    if comparison is not None:
        row += f"{comparison.without_relevant_hit:>+12}"
    lines.append(row)
    if comparison is not None:
        lines.append(
            f"\ndifference: {comparison.other} - {comparison.baseline}, per query, averaged; p: two-sided paired "
            "t-test over queries ('-': every query moved alike)"
        )
    return "\n".join(lines)


def _measure_label(measure: str) -> str:
    return "RR (mean: MRR)" if measure == "RR" else measure


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3f}"
