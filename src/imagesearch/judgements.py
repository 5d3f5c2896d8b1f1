"""Judgement lists for `imagesearch evaluate`: graded products per query, read from JSONL or CSV, every mistake
reported with its file and line.

    {"query": "red mug", "product_id": "p00012", "grade": 2}
    {"image": "photos/q1.jpg", "product_id": "p00031", "grade": 1, "query_id": "photo-1"}
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ir_measures

COLUMNS = ("query_id", "query", "image", "product_id", "grade")


class EvaluationError(ValueError):
    """The judgement list, a variant or the evaluation's options cannot be used; the message says why."""


class JudgementError(EvaluationError):
    def __init__(self, path: Path, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")


@dataclass(frozen=True)
class EvalQuery:
    query_id: str
    text: str
    image: Path | None
    line: int


@dataclass(frozen=True)
class Judgements:
    path: Path
    queries: tuple[EvalQuery, ...]
    # query id -> product id -> grade (0 = not relevant; the higher, the better).
    grades: Mapping[str, Mapping[str, int]]

    @property
    def count(self) -> int:
        return sum(len(products) for products in self.grades.values())

    def qrels(self) -> list[ir_measures.Qrel]:
        return [
            ir_measures.Qrel(query_id, product_id, grade)
            for query_id, products in self.grades.items()
            for product_id, grade in products.items()
        ]


def read_judgements(path: Path) -> Judgements:
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise EvaluationError(f"{path}: expected a .jsonl or .csv judgement list")
    try:
        rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path)
    except UnicodeDecodeError:
        raise EvaluationError(f"{path}: not UTF-8 text") from None
    queries: dict[str, EvalQuery] = {}
    grades: dict[str, dict[str, int]] = {}
    judged_at: dict[tuple[str, str], int] = {}
    for line, row in rows:
        query = _query(path, line, row)
        product_id = _text(path, line, row, "product_id")
        if not product_id:
            raise JudgementError(path, line, "product_id is missing")
        grade = _grade(path, line, row.get("grade"))
        first = queries.setdefault(query.query_id, query)
        if (first.text, first.image) != (query.text, query.image):
            raise JudgementError(
                path, line, f"query_id {query.query_id!r} is another query at line {first.line}: one query per id"
            )
        if (query.query_id, product_id) in judged_at:
            earlier = judged_at[query.query_id, product_id]
            raise JudgementError(path, line, f"{product_id} is judged for {query.query_id!r} at line {earlier} too")
        judged_at[query.query_id, product_id] = line
        grades.setdefault(query.query_id, {})[product_id] = grade
    if not queries:
        raise EvaluationError(f"{path}: no judgements")
    for query in queries.values():
        if not any(grades[query.query_id].values()):
            # nDCG, RR and recall are undefined without a relevant product: such a query cannot be scored.
            raise JudgementError(path, query.line, f"query {query.query_id!r} has no product with a grade above 0")
    return Judgements(path, tuple(queries.values()), grades)


def _jsonl_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise JudgementError(path, number, f"not JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise JudgementError(path, number, "expected a JSON object")
            _known_columns(path, number, row)
            rows.append((number, row))
    return rows


def _csv_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file)
        try:
            _known_columns(path, 1, dict.fromkeys(reader.fieldnames or ()))
            for row in reader:
                if None in row:
                    raise JudgementError(path, reader.line_num, "more cells than columns")
                # An empty cell is an absent value, as an absent key is in JSONL.
                rows.append((reader.line_num, {key: value for key, value in row.items() if value not in ("", None)}))
        except csv.Error as exc:
            raise JudgementError(path, reader.line_num, f"not CSV: {exc}") from None
    return rows


def _known_columns(path: Path, line: int, row: Mapping[str, object]) -> None:
    unknown = sorted(set(row) - set(COLUMNS))
    if unknown:
        raise JudgementError(path, line, f"unknown column {unknown[0]!r}; expected {', '.join(COLUMNS)}")


def _text(path: Path, line: int, row: Mapping[str, object], key: str) -> str:
    value = row.get(key, "")
    if isinstance(value, int) and not isinstance(value, bool) and key == "query_id":
        return str(value)
    if not isinstance(value, str):
        raise JudgementError(path, line, f"{key} must be a string, got {value!r}")
    return value.strip()


def _query(path: Path, line: int, row: Mapping[str, object]) -> EvalQuery:
    text = _text(path, line, row, "query")
    image_name = _text(path, line, row, "image")
    if not text and not image_name:
        raise JudgementError(path, line, "needs a query (text) or an image (a file), or both")
    image = None
    if image_name:
        image = path.parent / image_name
        if not image.is_file():
            raise JudgementError(path, line, f"image {image_name!r} not found (looked for {image})")
    default_id = f"{text} + {image_name}" if text and image_name else text or image_name
    return EvalQuery(_text(path, line, row, "query_id") or default_id, text, image, line)


def _grade(path: Path, line: int, value: object) -> int:
    if value is None:
        raise JudgementError(path, line, "grade is missing")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise JudgementError(path, line, f"grade must be a whole number >= 0, got {value!r}") from None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise JudgementError(path, line, f"grade must be a whole number >= 0, got {value!r}")
    return value
