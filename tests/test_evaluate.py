"""Offline evaluation (`imagesearch evaluate`): the judgement list reader's errors, variants, the metric plumbing
on hand-made rankings (ir-measures computes; these pin its inputs and outputs), and the example judgement list
(examples/evaluation) against the demo's catalogue on the real server with the bundled model, with floors."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import ir_measures
import pytest
import pytest_asyncio
from conftest import RunningServer, jpeg_bytes, start_server, stop_server
from test_cli import run_cli

from imagesearch import cli
from imagesearch.client import ImageSearchClient, search_query
from imagesearch.config import Settings
from imagesearch.demo import indexed
from imagesearch.evaluate import (
    DEFAULT_VARIANT,
    QueryFailed,
    Report,
    Variant,
    evaluate,
    format_report,
    measures,
    parse_variant,
    report_json,
    score,
    search_keywords,
)
from imagesearch.judgements import EvalQuery, EvaluationError, Judgements, read_judgements
from imagesearch.model.encoder import ClipEncoder
from imagesearch.v1 import image_search_service_pb2 as pb

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "evaluation"
module_loop = pytest.mark.asyncio(loop_scope="module")


def load_example_script() -> ModuleType:
    """examples/evaluation/make_judgements.py, loaded by path: a script, not a package module."""
    spec = importlib.util.spec_from_file_location("make_judgements", EXAMPLE / "make_judgements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(*rows: object) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


# --- the judgement list ---------------------------------------------------------------------------------------


def test_read_judgements_reads_jsonl_and_csv_alike(tmp_path: Path) -> None:
    (tmp_path / "q.jpg").write_bytes(jpeg_bytes())
    from_jsonl = read_judgements(
        write(
            tmp_path / "j.jsonl",
            jsonl(
                {"query": "red mug", "product_id": "p1", "grade": 2},
                {"query": "red mug", "product_id": "p2", "grade": 0},
                {"image": "q.jpg", "product_id": "p1", "grade": 1},
                {"query_id": 7, "query": "mug", "product_id": "p3", "grade": 1},
            )
            + "\n",  # blank lines are skipped
        )
    )
    from_csv = read_judgements(
        write(
            tmp_path / "j.csv",
            "query_id,query,image,product_id,grade\n,red mug,,p1,2\n,red mug,,p2,0\n,,q.jpg,p1,1\n7,mug,,p3,1\n",
        )
    )
    for judgements in (from_jsonl, from_csv):
        assert [(q.query_id, q.text, q.image) for q in judgements.queries] == [
            ("red mug", "red mug", None),
            ("q.jpg", "", tmp_path / "q.jpg"),
            ("7", "mug", None),
        ]
        assert judgements.grades == {"red mug": {"p1": 2, "p2": 0}, "q.jpg": {"p1": 1}, "7": {"p3": 1}}
        assert judgements.count == 4


@pytest.mark.parametrize(
    ("line", "message"),
    [
        pytest.param({"query": "mug", "product_id": "p2", "grade": -1}, "grade must be", id="negative-grade"),
        pytest.param({"query": "mug", "product_id": "p2", "grade": 1.5}, "grade must be", id="fractional-grade"),
        pytest.param({"query": "mug", "product_id": "p2", "grade": "two"}, "grade must be", id="word-grade"),
        pytest.param({"query": "mug", "product_id": "p2", "grade": True}, "grade must be", id="boolean-grade"),
        pytest.param({"query": "mug", "product_id": "p2"}, "grade is missing", id="missing-grade"),
        pytest.param({"query": "mug", "grade": 1}, "product_id is missing", id="missing-product-id"),
        pytest.param({"query": "mug", "product_id": 12, "grade": 1}, "product_id must be a string", id="number-id"),
        pytest.param({"image": "nope.jpg", "product_id": "p2", "grade": 1}, "'nope.jpg' not found", id="no-image"),
        pytest.param({"product_id": "p2", "grade": 1}, "needs a query (text) or an image", id="no-query"),
        pytest.param({"query": "mug", "product_id": "p2", "grade": 1, "score": 3}, "unknown column 'score'", id="col"),
        pytest.param({"query": "mug", "product_id": "p1", "grade": 1}, "p1 is judged for 'mug' at line 1", id="dup"),
        pytest.param(
            {"query_id": "mug", "query": "cup", "product_id": "p2", "grade": 1},
            "query_id 'mug' is another query at line 1",
            id="query-id-reused",
        ),
        pytest.param(["mug", "p2", 1], "expected a JSON object", id="array"),
    ],
)
def test_read_judgements_rejects_a_bad_line_naming_it(tmp_path: Path, line: object, message: str) -> None:
    path = write(tmp_path / "j.jsonl", jsonl({"query": "mug", "product_id": "p1", "grade": 2}, line))
    with pytest.raises(EvaluationError) as err:
        read_judgements(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("query,product_id,grade,score\nmug,p1,2,9\n", ":1: unknown column 'score'", id="unknown-column"),
        pytest.param("query,product_id,grade\nmug,p1,2\nmug,p2,high\n", ":3: grade must be", id="bad-grade"),
        pytest.param("query,product_id,grade\nmug,p1,2\nmug,,1\n", ":3: product_id is missing", id="no-product-id"),
        pytest.param("query,product_id,grade\nmug,p1,2,extra\n", ":2: more cells than columns", id="extra-cell"),
        pytest.param("query,image,product_id,grade\n,x.png,p1,2\n", ":2: image 'x.png' not found", id="no-image"),
    ],
)
def test_read_judgements_rejects_a_bad_csv_line_naming_it(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path / "j.csv", text)
    with pytest.raises(EvaluationError, match=message):
        read_judgements(path)


def test_read_judgements_rejects_a_query_without_a_relevant_product(tmp_path: Path) -> None:
    path = write(
        tmp_path / "j.jsonl",
        jsonl({"query": "mug", "product_id": "p1", "grade": 2}, {"query": "cup", "product_id": "p1", "grade": 0}),
    )
    with pytest.raises(EvaluationError, match=r":2: query 'cup' has no product with a grade above 0"):
        read_judgements(path)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        pytest.param("j.jsonl", "", "no judgements", id="empty"),
        pytest.param("j.jsonl", '{"query": "mug"\n', ":1: not JSON", id="not-json"),
        pytest.param("j.txt", "query,product_id,grade\n", "expected a .jsonl or .csv", id="suffix"),
    ],
)
def test_read_judgements_rejects_an_unusable_file(tmp_path: Path, name: str, text: str, message: str) -> None:
    with pytest.raises(EvaluationError, match=message):
        read_judgements(write(tmp_path / name, text))


def test_read_judgements_rejects_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "j.csv"
    path.write_bytes(b"query,product_id,grade\nmug,p1,2\n\xff\xfe,p2,1\n")
    with pytest.raises(EvaluationError, match="not UTF-8 text"):
        read_judgements(path)


def test_evaluate_command_exits_2_on_a_bad_judgement_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "j.jsonl", jsonl({"query": "mug", "product_id": "p1", "grade": "high"}))
    # The list is read before any server is called: nothing listens on this port.
    assert cli.main(["evaluate", str(path), "--target", "127.0.0.1:9"]) == cli.EXIT_USAGE
    assert f"{path}:1: grade must be a whole number" in capsys.readouterr().err


# --- variants -------------------------------------------------------------------------------------------------


def test_parse_variant_reads_name_target_and_fields(tmp_path: Path) -> None:
    assert parse_variant('dense={"mode": "SEARCH_MODE_DENSE"}') == Variant(
        "dense", pb.SearchQuery(mode=pb.SEARCH_MODE_DENSE)
    )
    weights = parse_variant('lex0.7@other:50052={"hybridSpec": {"lexicalWeight": 0.7}}')
    assert (weights.name, weights.target) == ("lex0.7", "other:50052")
    assert weights.fields.hybrid_spec.lexical_weight == pytest.approx(0.7)
    rules = write(tmp_path / "rules.json", json.dumps({"ranking": {"rules": [{"name": "cheap", "field": "price"}]}}))
    assert parse_variant(f"rules=@{rules}").fields.ranking.rules[0].field == "price"
    assert parse_variant("default={}") == Variant("default", pb.SearchQuery())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        pytest.param("dense", "expected NAME", id="no-equals"),
        pytest.param('={"mode": 1}', "expected NAME", id="no-name"),
        pytest.param("x@={}", "expected NAME", id="empty-target"),
        pytest.param("x=[1]", "expected a JSON object", id="array"),
        pytest.param("x={mode}", "not JSON", id="not-json"),
        pytest.param('x={"colour": "red"}', "not a SearchQuery", id="unknown-field"),
        pytest.param('x={"mode": "SEARCH_MODE_FAST"}', "not a SearchQuery", id="unknown-enum"),
        pytest.param('x={"topK": 5}', "top_k is set by the evaluation", id="top-k"),
        pytest.param('x={"text": "mug"}', "text is set by the evaluation", id="text"),
        pytest.param("x=@/nonexistent/rules.json", "cannot read", id="missing-file"),
    ],
)
def test_parse_variant_rejects_what_it_cannot_use(spec: str, message: str) -> None:
    with pytest.raises(EvaluationError, match=message):
        parse_variant(spec)


def test_search_keywords_give_the_client_the_same_query() -> None:
    query = pb.SearchQuery(
        text="red mug",
        top_k=100,
        filter=pb.SearchFilter(categories=["mug"], price_max=50, attributes={"colour": "red"}),
        mode=pb.SEARCH_MODE_HYBRID,
        hybrid_spec=pb.SearchQuery.HybridSpec(fusion=pb.SearchQuery.HybridSpec.FUSION_RECIPROCAL_RANK),
        score_threshold=0.1,
        like_product_ids=["p1"],
        ranking=pb.RankingSpec(rules=[pb.RankingRule(name="cheap", field="price", weight=0.5)]),
    )
    assert search_query(**search_keywords(query)) == query


# --- metrics: ir-measures on hand-made rankings ---------------------------------------------------------------

HAND_MADE_GRADES = {"q1": {"a": 2, "b": 1, "n": 0}, "q2": {"c": 1}, "q3": {"d": 2}, "q4": {"a": 1}}
HAND_MADE = Judgements(
    Path("hand-made.jsonl"),
    tuple(EvalQuery(q, q, None, i) for i, q in enumerate(HAND_MADE_GRADES, 1)),
    HAND_MADE_GRADES,
)
HAND_MADE_RUN = {
    "q1": ["a", "b", "n"],  # both relevant products first, the better first: perfect
    "q2": ["x", "y", "c"],  # the one relevant product third
    "q3": [],  # no results at all
    # "a" first: trec_eval would put "z" first if the scores tied (it breaks ties by id, descending), so this pins
    # that the server's order is kept.
    "q4": ["a", "z"],
}


def test_score_computes_the_obvious_values_of_hand_made_rankings() -> None:
    result = score(HAND_MADE, HAND_MADE_RUN, DEFAULT_VARIANT, measures([1, 10]), target="t", model="m")
    assert result.per_query == {
        "q1": {"nDCG@10": pytest.approx(1.0), "RR": 1.0, "R@1": 0.5, "R@10": 1.0},
        # DCG 1/log2(4), ideal 1/log2(2): 0.5
        "q2": {"nDCG@10": pytest.approx(0.5), "RR": pytest.approx(1 / 3), "R@1": 0.0, "R@10": 1.0},
        "q3": {"nDCG@10": 0.0, "RR": 0.0, "R@1": 0.0, "R@10": 0.0},
        "q4": {"nDCG@10": pytest.approx(1.0), "RR": 1.0, "R@1": 1.0, "R@10": 1.0},
    }
    assert result.means == {
        "nDCG@10": pytest.approx(2.5 / 4),
        "RR": pytest.approx((2 + 1 / 3) / 4),
        "R@1": pytest.approx(1.5 / 4),
        "R@10": pytest.approx(3 / 4),
    }
    assert result.without_relevant_hit == 1  # q3


def test_score_weighs_grades_in_ndcg() -> None:
    # The grade-1 product before the grade-2 one: DCG 1 + 2/log2(3) against the ideal 2 + 1/log2(3).
    result = score(HAND_MADE, {"q1": ["b", "a"]}, DEFAULT_VARIANT, measures([10]), target="t", model="m")
    assert result.per_query["q1"]["nDCG@10"] == pytest.approx((1 + 2 / 1.5849625) / (2 + 1 / 1.5849625))
    assert result.per_query["q1"]["RR"] == 1.0  # a grade 1 product is relevant


def test_score_means_are_ir_measures_own_aggregates() -> None:
    wanted = measures([1, 10])
    result = score(HAND_MADE, HAND_MADE_RUN, DEFAULT_VARIANT, wanted, target="t", model="m")
    run = [
        ir_measures.ScoredDoc(q, pid, float(len(ids) - rank))
        for q, ids in HAND_MADE_RUN.items()
        for rank, pid in enumerate(ids)
    ]
    aggregate = ir_measures.calc_aggregate(wanted, HAND_MADE.qrels(), run)
    assert result.means == {str(m): pytest.approx(value) for m, value in aggregate.items()}


def test_report_compares_two_variants_per_query() -> None:
    wanted = measures([10])
    base = score(HAND_MADE, HAND_MADE_RUN, Variant("base", pb.SearchQuery()), wanted, target="t", model="m")
    better_run = {**HAND_MADE_RUN, "q2": ["c"], "q3": ["d"]}
    other = score(HAND_MADE, better_run, Variant("other", pb.SearchQuery()), wanted, target="t", model="m")
    report = Report(HAND_MADE, ("nDCG@10", "RR", "R@10"), 10, (base, other))
    comparison = report.comparison()
    assert comparison is not None
    assert comparison.difference["RR"] == pytest.approx((2 / 3 + 1) / 4)
    assert comparison.without_relevant_hit == -1
    assert comparison.p_value["RR"] is not None and 0 < comparison.p_value["RR"] < 1
    assert comparison.p_value["R@10"] is not None
    same = Report(HAND_MADE, ("RR",), 10, (base, base)).comparison()
    assert same is not None and same.p_value["RR"] is None  # no query moved: the test is undefined
    table = format_report(report)
    assert "base" in table and "other" in table and "difference" in table and "p (paired t)" in table
    assert json.loads(json.dumps(report_json(report)))["comparison"]["baseline"] == "base"


# --- the example, against the demo's catalogue on the real server ---------------------------------------------

# Measured on the bundled model (synthetic-clip), this test's server, 2-core AMD EPYC: 357 queries, all four 0.998
# to 1.000 (nDCG@10 0.998, RR 0.999, R@10 1.000, R@100 1.000), no query without a relevant hit. The floors leave a
# margin for another CPU's or runtime's rounding; a broken lexical side (codes no longer found: hybrid at the
# dense figures, nDCG@10 0.770, 46 queries without a relevant hit) fails every one.
FLOORS = {"nDCG@10": 0.95, "RR": 0.95, "R@10": 0.95, "R@100": 0.97}
MOST_QUERIES_WITHOUT_A_RELEVANT_HIT = 3


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return load_example_script()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def demo(
    tmp_path_factory: pytest.TempPathFactory, encoder: ClipEncoder, example: ModuleType
) -> AsyncIterator[RunningServer]:
    """A server holding the catalogue `imagesearch demo` indexes, indexed as the demo does (demo.py)."""
    settings = Settings(host="127.0.0.1", port=0, data_dir=tmp_path_factory.mktemp("demo"), model="synthetic-clip")
    running = await start_server(settings, encoder)
    async with ImageSearchClient(running.target) as client:
        products = indexed(example.catalogue())
        assert not [r async for r in client.index_products(products) if r.HasField("error")]
    yield running
    await stop_server(running)


def test_example_judgements_are_those_of_the_script_for_the_demo_catalogue(example: ModuleType) -> None:
    assert example.main(["--check"]) == 0
    assert cli._parser().parse_args(["demo"]).products == example.DEMO_PRODUCTS
    assert all(
        (EXAMPLE / "images" / f"{p}-{c}-{k}.jpg").stat().st_size < 10_000
        for p, c, k in example.photos(example.catalogue())
    )


@module_loop
async def test_example_scores_at_least_its_floors(demo: RunningServer) -> None:
    judgements = read_judgements(EXAMPLE / "judgements.jsonl")
    report = await evaluate(judgements, [DEFAULT_VARIANT], target=demo.target)
    (result,) = report.results
    assert (result.model, report.depth, len(result.per_query)) == ("synthetic-clip", 100, len(judgements.queries))
    below = {m: round(result.means[m], 3) for m, floor in FLOORS.items() if result.means[m] < floor}
    assert not below, f"below the floors {FLOORS}: {below}\n{format_report(report)}"
    assert result.without_relevant_hit <= MOST_QUERIES_WITHOUT_A_RELEVANT_HIT, format_report(report)
    as_json = report_json(report)
    assert as_json["variants"][0]["metrics"] == dict(result.means)
    assert set(as_json["variants"][0]["per_query"]) == {q.query_id for q in judgements.queries}


@module_loop
async def test_evaluate_command_compares_dense_and_hybrid_side_by_side(demo: RunningServer, tmp_path: Path) -> None:
    # Text queries only: hybrid mode matches words, and the server refuses it for a photo (next test).
    lines = (EXAMPLE / "judgements.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    text_only = write(tmp_path / "text.jsonl", "".join(line for line in lines if '"image"' not in line))
    code, out, err = await run_cli(
        "evaluate", str(text_only), "--target", demo.target,
        "--variant", 'dense={"mode": "SEARCH_MODE_DENSE"}', "--variant", 'hybrid={"mode": "SEARCH_MODE_HYBRID"}',
    )  # fmt: skip
    assert code == 0, err
    header = next(line for line in out.splitlines() if "difference" in line)
    assert header.split() == ["dense", "hybrid", "difference", "p", "(paired", "t)"]
    ndcg = next(line for line in out.splitlines() if line.startswith("nDCG@10")).split()
    dense, hybrid, difference = (float(v) for v in ndcg[1:4])
    assert hybrid > dense and difference == pytest.approx(hybrid - dense, abs=0.002), out
    code, out, err = await run_cli(
        "evaluate", str(text_only), "--target", demo.target, "--recall-at", "5,20", "--json",
        "--variant", 'dense={"mode": "SEARCH_MODE_DENSE"}', "--variant", 'hybrid={"mode": "SEARCH_MODE_HYBRID"}',
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert (report["measures"], report["depth"]) == (["nDCG@10", "RR", "R@5", "R@20"], 20)
    assert [v["name"] for v in report["variants"]] == ["dense", "hybrid"]
    assert report["comparison"]["p_value"]["nDCG@10"] < 0.01


@module_loop
async def test_evaluate_names_the_query_a_variant_cannot_run(demo: RunningServer) -> None:
    judgements = read_judgements(EXAMPLE / "judgements.jsonl")
    hybrid = parse_variant('hybrid={"mode": "SEARCH_MODE_HYBRID"}')
    with pytest.raises(QueryFailed) as err:
        await evaluate(judgements, [hybrid], target=demo.target)
    assert err.value.code.name == "INVALID_ARGUMENT" and "'photo/" in str(err.value)


@module_loop
async def test_evaluate_runs_a_variant_on_its_own_server(demo: RunningServer, tmp_path: Path) -> None:
    path = write(tmp_path / "j.jsonl", jsonl({"query": "red mug", "product_id": "p00000", "grade": 1}))
    # The default target has no server: only the variant's own is asked.
    elsewhere = Variant("elsewhere", pb.SearchQuery(), target=demo.target)
    report = await evaluate(read_judgements(path), [elsewhere], target="127.0.0.1:9")
    assert report.results[0].target == demo.target


@module_loop
async def test_evaluate_refuses_cutoffs_beyond_the_servers_max_top_k(demo: RunningServer, tmp_path: Path) -> None:
    path = write(tmp_path / "j.jsonl", jsonl({"query": "red mug", "product_id": "p00000", "grade": 1}))
    with pytest.raises(EvaluationError, match=r"at most 100 results \(max_top_k\)"):
        await evaluate(read_judgements(path), [DEFAULT_VARIANT], target=demo.target, recall_at=[10, 200])
