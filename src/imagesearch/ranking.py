"""The vocabulary of business-rule ranking: rules over numeric attributes and filters, and score explanations.

A rule gives every candidate a value f (a numeric attribute, optionally transformed, or 1/0 for "matches this
filter") and a weight w; the score is relevance * prod(1 + w * f over MULTIPLY rules) + sum(w * f over ADD rules).
The formula itself is built once, backend-neutral, in store/ranking_formula.py, which both stores compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from imagesearch.domain import SearchFilter

Transform = Literal["identity", "log1p", "linear_decay", "exp_decay", "gauss_decay"]
TRANSFORMS: tuple[Transform, ...] = ("identity", "log1p", "linear_decay", "exp_decay", "gauss_decay")
DECAYS: frozenset[Transform] = frozenset({"linear_decay", "exp_decay", "gauss_decay"})
Combine = Literal["add", "multiply"]
COMBINES: tuple[Combine, ...] = ("add", "multiply")

#: The payload object that holds a product's numeric attributes (a rule's field "x" reads "numbers.x").
NUMBERS = "numbers"


@dataclass(frozen=True)
class Decay:
    """f is 1 at `target` and `midpoint` at distance `scale` from it (Qdrant's decay functions)."""

    target: float
    scale: float
    midpoint: float = 0.5


@dataclass(frozen=True)
class RankingRule:
    """One rule: exactly one of `field` (a numeric attribute) or `matches` (a filter: f = 1 when it admits the
    product, else 0)."""

    name: str
    weight: float
    field: str | None = None
    matches: SearchFilter | None = None
    transform: Transform = "identity"
    decay: Decay | None = None
    combine: Combine = "add"
    missing_value: float = 0.0

    def key_value(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weight": float(self.weight),
            "field": self.field,
            "matches": None if self.matches is None else self.matches.key_value(),
            "transform": self.transform,
            "decay": None if self.decay is None else [float(v) for v in vars(self.decay).values()],
            "combine": self.combine,
            "missing_value": float(self.missing_value),
        }


@dataclass(frozen=True)
class RankingSpec:
    """The rules of one search and how many of the best matches by relevance they reorder."""

    rules: tuple[RankingRule, ...]
    candidates: int

    def key_value(self) -> dict[str, Any]:
        return {"rules": [rule.key_value() for rule in self.rules], "candidates": self.candidates}


@dataclass(frozen=True)
class RankingRequest:
    """A request's `ranking` as sent, before the rules of search/validation.py: rules in wire form are converted
    by api/convert.py into RankingRule (so the checks can name each field); candidates 0 when unset."""

    rules: tuple[RankingRule, ...]
    candidates: int = 0


@dataclass(frozen=True)
class RuleContribution:
    """What one rule did to a hit: its value f and w * f."""

    name: str
    value: float
    weighted: float


@dataclass(frozen=True)
class ScoreExplanation:
    """How a hit's score was formed: its relevance (the score without rules), its cosine similarity to the query
    where the search has a dense side, and each rule's part."""

    relevance: float
    similarity: float | None
    rules: tuple[RuleContribution, ...] = ()

    def to_row(self) -> list[Any]:
        return [self.relevance, self.similarity, [[r.name, r.value, r.weighted] for r in self.rules]]

    @classmethod
    def from_row(cls, row: Any) -> ScoreExplanation:
        relevance, similarity, rules = row
        return cls(
            float(relevance),
            None if similarity is None else float(similarity),
            tuple(RuleContribution(str(n), float(v), float(w)) for n, v, w in rules),
        )
