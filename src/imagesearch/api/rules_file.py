"""The server's default ranking rules (IMAGESEARCH_RANKING_RULES_FILE): a `RankingSpec` in proto3 JSON, read and
checked by the same rules as a request's, once at start, so that a typo stops the start instead of every search.

    {"rules": [{"name": "popular", "field": "popularity", "transform": "TRANSFORM_LOG1P", "weight": 0.02},
               {"name": "bury-refurbished", "matches": {"attributes": {"condition": "refurbished"}},
                "weight": -0.5, "combine": "COMBINE_MULTIPLY"}]}
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import json_format

from imagesearch.api.convert import ranking_from_proto
from imagesearch.errors import InvalidArgument
from imagesearch.ranking import RankingSpec
from imagesearch.search.validation import Violations, ranking_spec
from imagesearch.v1 import image_search_service_pb2 as pb


class RulesFileError(ValueError):
    """The default rules file cannot be read or breaks a rule; the message names the file and the field."""


def load_ranking_rules(path: Path) -> RankingSpec | None:
    """The rules in `path`; None when it holds none (relevance alone)."""
    try:
        message = json_format.Parse(path.read_text(encoding="utf-8"), pb.RankingSpec())
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesFileError(f"cannot read ranking rules file {path}: {exc}") from None
    except json_format.ParseError as exc:
        raise RulesFileError(f"{path} is not a RankingSpec in proto3 JSON: {exc}") from None
    v = Violations()
    try:
        spec = ranking_spec(ranking_from_proto(message, "ranking"), "ranking", v)
        v.raise_if_any()
    except InvalidArgument as exc:
        problems = "; ".join(f"{violation.field}: {violation.description}" for violation in exc.violations)
        raise RulesFileError(f"{path}: {problems}") from None
    return spec
