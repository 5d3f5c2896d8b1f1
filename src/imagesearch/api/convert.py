"""proto <-> domain: plain mapping, no rules (those live in search/validation.py, with their defaults)."""

from __future__ import annotations

import dataclasses
from typing import Any

from imagesearch.config import Settings
from imagesearch.domain import (
    PRODUCT_SCALAR_FIELDS,
    CacheOutcome,
    CatalogDescription,
    DuplicatesRequest,
    Facets,
    FacetSpec,
    Fusion,
    Hit,
    ListRequest,
    Product,
    QueryKind,
    QueryRequest,
    SearchFilter,
    SearchMode,
    SearchOutcome,
)
from imagesearch.errors import FieldViolation, InvalidArgument
from imagesearch.images import DuplicatesPage, NormalizedBox, ProductImage
from imagesearch.ranking import Combine, Decay, RankingRequest, RankingRule, ScoreExplanation, Transform
from imagesearch.v1 import image_search_service_pb2 as pb
from imagesearch.v1 import products_pb2

_QUERY_KINDS: dict[QueryKind, pb.QueryKind.ValueType] = {
    "text": pb.QUERY_KIND_TEXT,
    "image": pb.QUERY_KIND_IMAGE,
    "multimodal": pb.QUERY_KIND_MULTIMODAL,
    "recommend": pb.QUERY_KIND_RECOMMEND,
}
_SEARCH_MODES: dict[SearchMode, pb.SearchMode.ValueType] = {
    "dense": pb.SEARCH_MODE_DENSE,
    "hybrid": pb.SEARCH_MODE_HYBRID,
    "lexical": pb.SEARCH_MODE_LEXICAL,
}
_MODES_FROM_PROTO: dict[int, SearchMode | None] = {
    pb.SEARCH_MODE_UNSPECIFIED: None,
    **{number: mode for mode, number in _SEARCH_MODES.items()},
}
_Fusions = pb.SearchQuery.HybridSpec
_FUSIONS_FROM_PROTO: dict[int, Fusion | None] = {
    _Fusions.FUSION_UNSPECIFIED: None,
    _Fusions.FUSION_WEIGHTED_SCORE: "weighted",
    _Fusions.FUSION_RECIPROCAL_RANK: "rank",
}
_CACHE_OUTCOMES: dict[CacheOutcome, pb.CacheOutcome.ValueType] = {
    "hit": pb.CACHE_OUTCOME_HIT,
    "miss": pb.CACHE_OUTCOME_MISS,
    "bypass": pb.CACHE_OUTCOME_BYPASS,
}
_Rule = pb.RankingRule
_TRANSFORMS_FROM_PROTO: dict[int, Transform] = {
    _Rule.TRANSFORM_UNSPECIFIED: "identity",
    _Rule.TRANSFORM_IDENTITY: "identity",
    _Rule.TRANSFORM_LOG1P: "log1p",
    _Rule.TRANSFORM_LINEAR_DECAY: "linear_decay",
    _Rule.TRANSFORM_EXP_DECAY: "exp_decay",
    _Rule.TRANSFORM_GAUSS_DECAY: "gauss_decay",
}
_COMBINES_FROM_PROTO: dict[int, Combine] = {
    _Rule.COMBINE_UNSPECIFIED: "add",
    _Rule.COMBINE_ADD: "add",
    _Rule.COMBINE_MULTIPLY: "multiply",
}


def product_from_proto(message: products_pb2.Product) -> Product:
    return Product(
        **{f: getattr(message, f) for f in PRODUCT_SCALAR_FIELDS},
        attributes=dict(message.attributes),
        # sha256 is output only: what a caller sends there is ignored, the server sets it from the bytes.
        images=tuple(ProductImage(id=i.id, role=i.role, url=i.url) for i in message.images),
        numeric_attributes=dict(message.numeric_attributes),
    )


def product_to_proto(product: Product) -> products_pb2.Product:
    return products_pb2.Product(
        **{f: getattr(product, f) for f in PRODUCT_SCALAR_FIELDS},
        attributes=dict(product.attributes),
        images=[products_pb2.ProductImage(id=i.id, role=i.role, url=i.url, sha256=i.sha256) for i in product.images],
        numeric_attributes=dict(product.numeric_attributes),
    )


def filter_from_proto(message: pb.SearchFilter) -> SearchFilter:
    return SearchFilter(
        categories=tuple(message.categories),
        price_min=message.price_min if message.HasField("price_min") else None,
        price_max=message.price_max if message.HasField("price_max") else None,
        attributes=tuple(sorted(message.attributes.items())),
    )


def query_from_proto(message: pb.SearchQuery, image: bytes | None) -> QueryRequest:
    hybrid = message.hybrid_spec
    facets = None
    if message.HasField("facet_spec"):
        spec = message.facet_spec
        facets = FacetSpec(
            categories=spec.categories, attribute_keys=tuple(spec.attribute_keys), max_values=spec.max_values
        )
    return QueryRequest(
        text=message.text,
        image=image,
        image_url=message.image_url,
        flt=filter_from_proto(message.filter),
        top_k=message.top_k,
        page_size=message.page_size,
        page_token=message.page_token,
        score_threshold=message.score_threshold if message.HasField("score_threshold") else None,
        text_weight=message.text_weight if message.HasField("text_weight") else None,
        like_ids=tuple(message.like_product_ids),
        unlike_ids=tuple(message.unlike_product_ids),
        include_liked=message.include_liked_products,
        group_by=message.group_by,
        diversity=message.diversity if message.HasField("diversity") else None,
        facets=facets,
        mode=_enum_value(_MODES_FROM_PROTO, message.mode, "query.mode"),
        fusion=_enum_value(_FUSIONS_FROM_PROTO, hybrid.fusion, "query.hybrid_spec.fusion"),
        lexical_weight=hybrid.lexical_weight if hybrid.HasField("lexical_weight") else None,
        regions=tuple(NormalizedBox(b.x0, b.y0, b.x1, b.y1) for b in message.regions),
        collapse_duplicates=message.collapse_duplicates,
        duplicate_threshold=message.duplicate_threshold if message.HasField("duplicate_threshold") else None,
        ranking=ranking_from_proto(message.ranking, "query.ranking") if message.HasField("ranking") else None,
        explain=message.explain_scores,
    )


def ranking_from_proto(message: pb.RankingSpec, field: str) -> RankingRequest:
    """A RankingSpec (a request's, or the server's default rules file) as sent; search/validation.py checks it."""
    return RankingRequest(
        rules=tuple(_rule_from_proto(rule, f"{field}.rules[{i}]") for i, rule in enumerate(message.rules)),
        candidates=message.candidates,
    )


def _rule_from_proto(rule: pb.RankingRule, field: str) -> RankingRule:
    signal = rule.WhichOneof("signal")
    decay = None
    if rule.HasField("decay"):
        midpoint = rule.decay.midpoint if rule.decay.HasField("midpoint") else 0.5
        decay = Decay(target=rule.decay.target, scale=rule.decay.scale, midpoint=midpoint)
    return RankingRule(
        name=rule.name,
        weight=rule.weight,
        field=rule.field if signal == "field" else None,
        matches=filter_from_proto(rule.matches) if signal == "matches" else None,
        transform=_enum_value(_TRANSFORMS_FROM_PROTO, rule.transform, f"{field}.transform"),
        decay=decay,
        combine=_enum_value(_COMBINES_FROM_PROTO, rule.combine, f"{field}.combine"),
        missing_value=rule.missing_value if rule.HasField("missing_value") else 0.0,
    )


def _enum_value(values: dict[int, Any], number: int, field: str) -> Any:
    # proto3 enums are open: a client built from a newer contract can send a number this server does not know.
    if number not in values:
        raise InvalidArgument(FieldViolation(field, f"unknown value {number}"))
    return values[number]


def list_request_from_proto(request: pb.ListProductsRequest) -> ListRequest:
    return ListRequest(
        flt=filter_from_proto(request.filter), page_size=request.page_size, page_token=request.page_token
    )


def duplicates_request_from_proto(request: pb.FindDuplicatesRequest) -> DuplicatesRequest:
    return DuplicatesRequest(
        product_id=request.product_id,
        flt=filter_from_proto(request.filter),
        threshold=request.threshold if request.HasField("threshold") else None,
        page_size=request.page_size,
        page_token=request.page_token,
    )


def duplicates_to_proto(page: DuplicatesPage) -> pb.FindDuplicatesResponse:
    # images.Duplicate's fields carry the wire's names.
    return pb.FindDuplicatesResponse(
        products=[
            pb.ProductDuplicates(
                product_id=checked.product_id,
                duplicates=[pb.Duplicate(**dataclasses.asdict(d)) for d in checked.duplicates],
            )
            for checked in page.products
        ],
        next_page_token=page.next_page_token,
    )


def hits_to_proto(hits: list[Hit]) -> list[pb.SearchHit]:
    return [_hit_to_proto(h) for h in hits]


def _hit_to_proto(hit: Hit) -> pb.SearchHit:
    message = pb.SearchHit(
        product=product_to_proto(hit.product), score=hit.score, duplicate_product_ids=list(hit.duplicates)
    )
    if hit.matched_image is not None:
        message.matched_image_index = hit.matched_image
        images = hit.product.images
        message.matched_image_id = images[hit.matched_image].id if hit.matched_image < len(images) else ""
    if hit.explanation is not None:
        message.explanation.CopyFrom(_explanation_to_proto(hit.explanation))
    return message


def _explanation_to_proto(explanation: ScoreExplanation) -> pb.ScoreExplanation:
    message = pb.ScoreExplanation(
        relevance=explanation.relevance,
        rules=[
            pb.ScoreExplanation.RuleContribution(name=r.name, value=r.value, weighted=r.weighted)
            for r in explanation.rules
        ],
    )
    if explanation.similarity is not None:
        message.similarity = explanation.similarity
    return message


def facets_to_proto(facets: Facets | None) -> dict[str, Any]:
    """The SearchResponse fields for facets (none when not requested)."""
    if facets is None:
        return {}
    return {
        "category_facets": [pb.FacetCount(value=c.value, count=c.count) for c in facets.categories],
        "attribute_facets": [
            pb.AttributeFacet(key=key, values=[pb.FacetCount(value=c.value, count=c.count) for c in counts])
            for key, counts in facets.attributes
        ],
    }


def outcome_to_proto(outcome: SearchOutcome) -> pb.SearchResponse:
    return pb.SearchResponse(
        hits=hits_to_proto(outcome.hits),
        query_kind=_QUERY_KINDS[outcome.kind],
        cached=outcome.cached,
        server_time_ms=outcome.server_time_ms,
        embedding_cache=_CACHE_OUTCOMES[outcome.embedding_cache],
        result_cache=_CACHE_OUTCOMES[outcome.result_cache],
        next_page_token=outcome.next_page_token,
        mode=_SEARCH_MODES[outcome.mode],
        region_results=[
            pb.RegionResult(region=pb.NormalizedBox(**vars(box)), hits=hits_to_proto(hits))
            for box, hits in outcome.region_results
        ],
        **facets_to_proto(outcome.facets),
    )


# GetServiceInfo's model fields and the ModelDescription fields they report.
_MODEL_INFO = {
    "name": "model_id",
    "embedding_dimension": "dimension",
    "device": "device",
    "image_size": "image_size",
    "image_tower_precision": "image_precision",
    "text_tower_precision": "text_precision",
    "torch_threads": "torch_threads",
    "image_tower_runtime": "image_runtime",
    "text_tower_runtime": "text_runtime",
    "runtime_reason": "runtime_reason",
    "cpu": "cpu",
}


def service_info_to_proto(
    described: CatalogDescription, settings: Settings, server_version: str
) -> pb.GetServiceInfoResponse:
    Info = pb.GetServiceInfoResponse
    # The cache's counters and the limits carry the same names on the wire as in CacheDescription and Settings.
    limits = {field.name: getattr(settings, field.name) for field in Info.Limits.DESCRIPTOR.fields}
    return Info(
        server_version=server_version,
        model=Info.ModelInfo(**{wire: getattr(described.model, name) for wire, name in _MODEL_INFO.items()}),
        store=Info.StoreInfo(backend=described.store_backend, product_count=described.product_count),
        cache=Info.CacheInfo(**dataclasses.asdict(described.cache)),
        limits=Info.Limits(**limits),
    )
