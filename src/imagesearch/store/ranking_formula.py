"""Ranking rules (ranking.RankingSpec) as one backend-neutral formula (plan.py's trees): both backends compile it
into the query that ranks the candidates, and score explanations evaluate the same trees in Python
(plan.evaluate), so there is one definition of every rule's value.

    score = relevance * product over MULTIPLY rules of (1 + w * f)  +  sum over ADD rules of w * f
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

from imagesearch.ranking import NUMBERS, RankingRule, RankingSpec, RuleContribution
from imagesearch.store.layout import with_attribute_pairs
from imagesearch.store.plan import (
    Constant,
    Decay,
    Expression,
    Filter,
    Formula,
    IsEmpty,
    Ln,
    Matches,
    Max,
    Mult,
    Sum,
    Variable,
    evaluate,
    search_filter,
)

_DECAY_KINDS: dict[str, Literal["lin", "gauss", "exp"]] = {
    "linear_decay": "lin",
    "exp_decay": "exp",
    "gauss_decay": "gauss",
}


class RuleFormula(NamedTuple):
    """A RankingSpec's rules as formula trees: `values` holds each rule's f, which reads payload variables that a
    product may lack with their value in `defaults`."""

    rules: tuple[RankingRule, ...]
    values: tuple[Expression, ...]
    defaults: Mapping[str, float]
    candidates: int

    def formula(self, relevance: Expression) -> Formula:
        """The ruled score of a point whose relevance is `relevance`."""
        factors: list[Expression] = [relevance]
        terms: list[Expression] = []
        for rule, value in zip(self.rules, self.values, strict=True):
            weighted = Mult((Constant(rule.weight), value))
            if rule.combine == "multiply":
                factors.append(Sum((Constant(1.0), weighted)))
            else:
                terms.append(weighted)
        ruled_relevance = factors[0] if len(factors) == 1 else Mult(tuple(factors))
        return Formula(Sum((ruled_relevance, *terms)), dict(self.defaults))

    def contributions(self, payload: Mapping[str, Any], point_id: str) -> tuple[RuleContribution, ...]:
        """Each rule's f and w * f for one point (its payload as a hit carries it)."""
        matchable = with_attribute_pairs(payload)
        parts = []
        for rule, value in zip(self.rules, self.values, strict=True):
            f = evaluate(value, self.defaults, matchable, point_id)
            parts.append(RuleContribution(rule.name, f, rule.weight * f))
        return tuple(parts)

    def score(self, relevance: float, contributions: tuple[RuleContribution, ...]) -> float:
        """The ruled score from a relevance and the rules' contributions (the formula, evaluated in Python)."""
        pairs = list(zip(self.rules, contributions, strict=True))
        factor = math.prod(1.0 + part.weighted for rule, part in pairs if rule.combine == "multiply")
        return relevance * factor + math.fsum(part.weighted for rule, part in pairs if rule.combine == "add")

    def relevance(self, score: float, contributions: tuple[RuleContribution, ...]) -> float:
        """The relevance a ruled score came from (the formula inverted); NaN where the MULTIPLY rules zeroed it."""
        pairs = list(zip(self.rules, contributions, strict=True))
        factor = math.prod(1.0 + part.weighted for rule, part in pairs if rule.combine == "multiply")
        added = math.fsum(part.weighted for rule, part in pairs if rule.combine == "add")
        return (score - added) / factor if factor else math.nan


def rule_formula(spec: RankingSpec) -> RuleFormula:
    """The formula of `spec`'s rules (validated: search/validation/rules.py)."""
    defaults: dict[str, float] = {}
    values = tuple(_value(rule, defaults) for rule in spec.rules)
    return RuleFormula(spec.rules, values, defaults, spec.candidates)


def _value(rule: RankingRule, defaults: dict[str, float]) -> Expression:
    """The rule's f. Adds the default of the payload variable it reads to `defaults`."""
    if rule.matches is not None:
        flt = search_filter(rule.matches)
        return Constant(1.0) if flt is None else Matches(flt)
    assert rule.field is not None
    variable = f"{NUMBERS}.{rule.field}"
    default = defaults.setdefault(variable, rule.missing_value)
    x: Expression = Variable(variable)
    if rule.missing_value != default:
        # A formula has one default per variable: a second rule on the field with another missing value adds the
        # difference where the product lacks the field.
        missing = Matches(Filter(must=(IsEmpty(variable),)))
        x = Sum((x, Mult((Constant(rule.missing_value - default), missing))))
    if rule.transform == "identity":
        return x
    if rule.transform == "log1p":
        return Ln(Sum((Max((x, Constant(0.0))), Constant(1.0))))
    assert rule.decay is not None
    return Decay(_DECAY_KINDS[rule.transform], x, Constant(rule.decay.target), rule.decay.scale, rule.decay.midpoint)
