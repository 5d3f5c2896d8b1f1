"""The rules of ranking rules (a request's `ranking`, or the server's default rules file), with their defaults."""

from __future__ import annotations

import dataclasses
import math

from imagesearch.ranking import DECAYS, RankingRequest, RankingRule, RankingSpec
from imagesearch.search.validation.checks import Violations, check_filter, check_text
from imagesearch.search.validation.products import check_numeric_key

MAX_RULES = 16
MAX_RULE_NAME_CHARS = 64
MAX_RULE_WEIGHT = 1000.0
DEFAULT_CANDIDATES = 200
MAX_CANDIDATES = 1000


def ranking_spec(request: RankingRequest, field: str, v: Violations) -> RankingSpec | None:
    """The validated rules, defaults applied; None for an empty list (relevance alone)."""
    if len(request.rules) > MAX_RULES:
        v.add(f"{field}.rules", f"has {len(request.rules)} rules; the limit is {MAX_RULES}")
    if not 0 <= request.candidates <= MAX_CANDIDATES:
        v.add(
            f"{field}.candidates",
            f"must be 1 to {MAX_CANDIDATES} (0 means {DEFAULT_CANDIDATES}), got {request.candidates}",
        )
    rules = tuple(_rule(rule, f"{field}.rules[{i}]", i, v) for i, rule in enumerate(request.rules[:MAX_RULES]))
    if not rules:
        return None
    return RankingSpec(rules=rules, candidates=request.candidates or DEFAULT_CANDIDATES)


def _rule(rule: RankingRule, field: str, position: int, v: Violations) -> RankingRule:
    check_text(rule.name, f"{field}.name", MAX_RULE_NAME_CHARS, v)
    if (rule.field is None) == (rule.matches is None):
        v.add(field, "set exactly one of field (a numeric attribute) or matches (a filter)")
    if rule.field is not None:
        check_numeric_key(rule.field, f"{field}.field", v)
    if rule.matches is not None:
        check_filter(rule.matches, v, prefix=f"{field}.matches")
        if rule.transform != "identity":
            v.add(f"{field}.transform", "applies to a field; a matches rule is 1 or 0")
    _check_decay(rule, field, v)
    if not (math.isfinite(rule.weight) and abs(rule.weight) <= MAX_RULE_WEIGHT):
        v.add(f"{field}.weight", f"must be a finite number from {-MAX_RULE_WEIGHT:g} to {MAX_RULE_WEIGHT:g}")
    if not math.isfinite(rule.missing_value):
        v.add(f"{field}.missing_value", f"must be a finite number, got {rule.missing_value}")
    # A rule is named in score explanations; one without a name is named by its position.
    return rule if rule.name else dataclasses.replace(rule, name=f"rules[{position}]")


def _check_decay(rule: RankingRule, field: str, v: Violations) -> None:
    decay = rule.decay
    if rule.transform not in DECAYS:
        if decay is not None:
            v.add(f"{field}.decay", f"only the decay transforms take a decay, not {rule.transform}")
        return
    if decay is None:
        v.add(f"{field}.decay", f"required by the {rule.transform} transform: target, scale and midpoint")
        return
    if not math.isfinite(decay.target):
        v.add(f"{field}.decay.target", f"must be a finite number, got {decay.target}")
    if not (math.isfinite(decay.scale) and decay.scale > 0):
        v.add(f"{field}.decay.scale", f"must be a finite number > 0, got {decay.scale}")
    if not 0.0 < decay.midpoint < 1.0:  # also false for NaN
        v.add(f"{field}.decay.midpoint", f"must be between 0 and 1 (both excluded), got {decay.midpoint}")
