"""`imagesearch` command line: parse arguments, build Settings, call into the server or the client. Thin."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf import json_format

from imagesearch.cli_format import cutoffs, key_value, positive, print_duplicates, print_hits, region
from imagesearch.config import Settings, SettingsError, client_target

EXIT_USAGE = 2
EXIT_RPC_ERROR = 4
# Search options the client takes under the flag's own name.
_SEARCH_OPTIONS = (
    "top_k",
    "price_min",
    "price_max",
    "mode",
    "fusion",
    "lexical_weight",
    "collapse_duplicates",
    "duplicate_threshold",
)


def _fail(message: str, code: int) -> int:
    """Report a failure on stderr; the exit code to return."""
    print(message, file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as exc:
        return _fail(f"imagesearch: configuration error: {exc}", EXIT_USAGE)
    except grpc.aio.AioRpcError as exc:
        return _fail(f"imagesearch: {exc.code().name}: {exc.details()}", EXIT_RPC_ERROR)
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    from imagesearch import server
    from imagesearch.logs import configure_logging

    settings = Settings.from_env(
        host=args.host,
        port=args.port,
        data_dir=Path(args.data_dir) if args.data_dir else None,
        model=args.model,
        device=args.device,
        qdrant_url=args.qdrant_url,
        redis_url=args.redis_url,
        log_format=args.log_format,
        log_level=args.log_level,
        offline=True if args.offline else None,
        metrics_port=args.metrics_port,
        http_port=args.http_port,
    )
    configure_logging(settings.log_format, settings.log_level)
    return server.run(settings)


def _search(args: argparse.Namespace) -> int:
    from imagesearch.client import ImageSearchClient, load_ranking_spec
    from imagesearch.v1 import image_search_service_pb2 as pb

    image = Path(args.image).read_bytes() if args.image else None
    attributes = dict(key_value(a) for a in args.attr)
    if args.duplicate_threshold is not None and not args.collapse_duplicates:
        return _fail("imagesearch: --duplicate-threshold needs --collapse-duplicates", EXIT_USAGE)
    ranking = None
    if args.rules:
        try:
            ranking = load_ranking_spec(Path(args.rules))
        except (OSError, UnicodeDecodeError) as exc:
            return _fail(f"imagesearch: cannot read the rules file {args.rules}: {exc}", EXIT_USAGE)
        except json_format.ParseError as exc:
            return _fail(f"imagesearch: {args.rules} is not a RankingSpec in proto3 JSON: {exc}", EXIT_USAGE)

    async def go() -> int:
        async with ImageSearchClient(args.target or client_target()) as client:
            response = await client.search(
                text=args.text or "",
                image=image,
                categories=args.category,
                attributes=attributes,
                regions=args.region,
                ranking=ranking,
                explain=args.explain,
                **{name: getattr(args, name) for name in _SEARCH_OPTIONS},
            )
        if args.json:
            print(json_format.MessageToJson(response, indent=2))
            return 0
        mode = pb.SearchMode.Name(response.mode).removeprefix("SEARCH_MODE_").lower()
        about = f"({mode}, {response.server_time_ms:.1f} ms on the server, cached: {response.cached})"
        if response.region_results:
            print(f"{len(response.region_results)} regions  {about}")
            for result in response.region_results:
                r = result.region
                print(f"region {r.x0:g},{r.y0:g},{r.x1:g},{r.y1:g}: {len(result.hits)} hits")
                print_hits(result.hits, args.explain)
            return 0
        print(f"{len(response.hits)} hits  {about}")
        print_hits(response.hits, args.explain)
        return 0

    return asyncio.run(go())


def _duplicates(args: argparse.Namespace) -> int:
    from imagesearch.client import ImageSearchClient
    from imagesearch.v1 import image_search_service_pb2 as pb

    attributes = dict(key_value(a) for a in args.attr)
    where = {
        "categories": args.category,
        "price_min": args.price_min,
        "price_max": args.price_max,
        "attributes": attributes,
        "threshold": args.threshold,
    }

    async def go() -> int:
        found: list[pb.ProductDuplicates] = []
        async with ImageSearchClient(args.target or client_target()) as client:
            if args.product:
                found.extend((await client.find_duplicates(product_id=args.product, **where)).products)
            else:
                async for entry in client.all_duplicates(page_size=args.page_size, **where):
                    found.append(entry)
                    if not args.json:
                        print_duplicates(entry)
        if args.json:
            products = [json_format.MessageToDict(entry, preserving_proto_field_name=True) for entry in found]
            print(json.dumps({"products": products}, indent=2))
        elif args.product:
            for entry in found:
                print_duplicates(entry)
            if not found:
                print(f"{args.product}: no duplicates")
        else:
            print(f"{len(found)} products with duplicates")
        return 0

    return asyncio.run(go())


def _index(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from imagesearch.catalogue_files import CatalogueError, Entry, read_entries
    from imagesearch.client import ImageSearchClient

    entries = list(read_entries([Path(p) for p in args.paths], args.category or ""))
    unreadable = [e for e in entries if isinstance(e, CatalogueError)]
    products = [e for e in entries if isinstance(e, Entry)]
    for error in unreadable:
        print(f"skipped  {error}", file=sys.stderr)
    if not products:
        return _fail("imagesearch: nothing to index", EXIT_USAGE)

    async def go() -> int:
        created = updated = 0
        failed: list[str] = []
        started = time.monotonic()
        async with ImageSearchClient(args.target or client_target()) as client:
            with tqdm(total=len(products), unit="product", file=sys.stderr, disable=args.quiet) as progress:
                items = ((entry.product, entry.image_data()) for entry in products)
                async for response in client.index_products(items):
                    if response.HasField("error"):
                        source = products[response.position].source
                        failed.append(f"{source}: {response.id!r}: {response.error.message}")
                    elif response.created:
                        created += 1
                    else:
                        updated += 1
                    progress.update(1)
        for line in failed:
            print(f"failed   {line}", file=sys.stderr)
        elapsed = time.monotonic() - started
        print(
            f"{created} created, {updated} updated, {len(failed)} failed, {len(unreadable)} unreadable "
            f"in {elapsed:.1f} s ({len(products) / max(elapsed, 1e-9):.1f} products/s)"
        )
        return EXIT_RPC_ERROR if failed or unreadable else 0

    return asyncio.run(go())


def _demo(args: argparse.Namespace) -> int:
    from imagesearch.demo import run_demo
    from imagesearch.logs import configure_logging

    configure_logging("console", "warning")
    return asyncio.run(run_demo(products=args.products, port=args.port, keep_serving=args.serve))


def _info(args: argparse.Namespace) -> int:
    from imagesearch.client import ImageSearchClient

    async def go() -> int:
        async with ImageSearchClient(args.target or client_target()) as client:
            info = await client.service_info()
            health = await client.health()
        # Every field, even empty: a field missing from the output would read as "not supported".
        fields = json_format.MessageToDict(info, always_print_fields_with_no_presence=True)
        print(json.dumps({"health": health, **fields}, indent=2))
        return 0

    return asyncio.run(go())


def _get(args: argparse.Namespace) -> int:
    from imagesearch.client import ImageSearchClient

    async def go() -> int:
        async with ImageSearchClient(args.target or client_target()) as client:
            product = await client.get_product(args.id)
        print(json_format.MessageToJson(product, indent=2))
        return 0

    return asyncio.run(go())


def _delete(args: argparse.Namespace) -> int:
    from imagesearch.client import ImageSearchClient

    async def go() -> int:
        async with ImageSearchClient(args.target or client_target()) as client:
            await client.delete_product(args.id)
        print(f"deleted {args.id}")
        return 0

    return asyncio.run(go())


def _evaluate(args: argparse.Namespace) -> int:
    # Imported here: the metrics library is not needed by any other command (serve starts without it).
    from imagesearch import evaluate
    from imagesearch.judgements import EvaluationError, read_judgements

    try:
        judgements = read_judgements(Path(args.judgements))
        variants = [evaluate.parse_variant(spec) for spec in args.variant] or [evaluate.DEFAULT_VARIANT]
        report = asyncio.run(
            evaluate.evaluate(
                judgements,
                variants,
                target=args.target or client_target(),
                recall_at=args.recall_at or evaluate.DEFAULT_RECALL_AT,
                concurrency=args.concurrency or evaluate.DEFAULT_CONCURRENCY,
            )
        )
    except (EvaluationError, OSError) as exc:
        return _fail(f"imagesearch: {exc}", EXIT_USAGE)
    except evaluate.QueryFailed as exc:
        return _fail(f"imagesearch: {exc}", EXIT_RPC_ERROR)
    print(json.dumps(evaluate.report_json(report), indent=2) if args.json else evaluate.format_report(report))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagesearch", description="Find catalogue products by image or text.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC server (flags override IMAGESEARCH_* variables)")
    serve.add_argument("--host", help="interface to bind (IMAGESEARCH_HOST, default [::])")
    serve.add_argument("--port", type=int, help="port (IMAGESEARCH_PORT, default 50051)")
    serve.add_argument("--data-dir", help="embedded store directory (IMAGESEARCH_DATA_DIR, default ./data)")
    serve.add_argument("--model", help="open_clip model spec (IMAGESEARCH_MODEL), see README")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], help="IMAGESEARCH_DEVICE, default auto")
    serve.add_argument("--qdrant-url", help="Qdrant server URL; unset = embedded store (IMAGESEARCH_QDRANT_URL)")
    serve.add_argument("--redis-url", help="Redis URL; unset = in-process cache (IMAGESEARCH_REDIS_URL)")
    serve.add_argument("--log-format", choices=["json", "console"], help="IMAGESEARCH_LOG_FORMAT, default json")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="IMAGESEARCH_LOG_LEVEL")
    serve.add_argument("--offline", action="store_true", help="never download weights (IMAGESEARCH_OFFLINE)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port; 0 = off (IMAGESEARCH_METRICS_PORT)")
    serve.add_argument(
        "--http-port", type=int, help="HTTP/JSON port (Connect, /docs); 0 = any free port (IMAGESEARCH_HTTP_PORT)"
    )
    serve.set_defaults(func=_serve)

    def client_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--target", help="server address (IMAGESEARCH_TARGET, default localhost:50051)")
        return sub

    search = client_command("search", "search a running server by text and/or image")
    search.add_argument("--text", help="query text")
    search.add_argument("--image", help="query image file")
    search.add_argument("--top-k", type=int, default=0, help="number of results (default 10, max 100)")
    search.add_argument("--category", action="append", default=[], help="restrict to a category (repeatable)")
    search.add_argument("--price-min", type=float)
    search.add_argument("--price-max", type=float)
    search.add_argument("--attr", action="append", default=[], help="attribute filter KEY=VALUE (repeatable)")
    search.add_argument(
        "--mode",
        choices=["dense", "hybrid", "lexical"],
        help="match the text by its CLIP vector (dense), its words (lexical) or both (hybrid); default: hybrid "
        "for a text-only search, dense otherwise",
    )
    search.add_argument(
        "--fusion", choices=["weighted", "rank"], help="hybrid: weighted scores (default) or reciprocal rank fusion"
    )
    search.add_argument("--lexical-weight", type=float, help="hybrid, weighted fusion: the words' weight, 0-1 (0.5)")
    search.add_argument(
        "--region",
        action="append",
        default=[],
        type=region,
        metavar="X0,Y0,X1,Y1",
        help="search for this box of the query image, in fractions 0-1 of its width and height (repeatable: "
        "one result list per box)",
    )
    search.add_argument(
        "--collapse-duplicates",
        action="store_true",
        help="fold near-duplicate listings into the best-ranked one (listed under it)",
    )
    search.add_argument(
        "--duplicate-threshold",
        type=float,
        metavar="T",
        help="with --collapse-duplicates: the image similarity from which listings are near copies, (0, 1] (0.94)",
    )
    search.add_argument(
        "--rules",
        metavar="FILE",
        help="ranking rules: a RankingSpec in proto3 JSON, like IMAGESEARCH_RANKING_RULES_FILE (replaces the "
        "server's default rules; {} for none)",
    )
    search.add_argument(
        "--explain", action="store_true", help="show each hit's matched image and how its score was formed"
    )
    search.add_argument("--json", action="store_true", help="print the raw response as JSON")
    search.set_defaults(func=_search)

    index = client_command(
        "index", "bulk-index image files, folders of images, .jsonl or .csv catalogues (see catalogue_files.py)"
    )
    index.add_argument("paths", nargs="+", metavar="PATH")
    index.add_argument("--category", help="category for products from bare image files")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    index.set_defaults(func=_index)

    demo = commands.add_parser(
        "demo", help="offline demo: serve the bundled test model, index a generated catalogue, run searches"
    )
    demo.add_argument("--products", type=int, default=240, help="catalogue size (default 240)")
    demo.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    demo.add_argument("--serve", action="store_true", help="keep serving after the demo (Ctrl-C to stop)")
    demo.set_defaults(func=_demo)

    evaluate = client_command(
        "evaluate", "score a running server's rankings against a judgement list: nDCG@10, MRR, recall@k"
    )
    evaluate.add_argument(
        "judgements",
        metavar="JUDGEMENTS",
        help=".jsonl or .csv; each line a query (text) or image (a file, relative to the list), a product_id and "
        "its grade (0 = not relevant; higher = better), optionally a query_id",
    )
    evaluate.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME[@TARGET]=JSON",
        help="a setting to score: SearchQuery fields in proto3 JSON merged into every query, or =@FILE; @TARGET: "
        "another server. Repeatable: one column each, two side by side with their difference. Default: one "
        "column, the server's defaults",
    )
    evaluate.add_argument("--recall-at", type=cutoffs, metavar="K,...", help="recall cutoffs (default 10,100)")
    evaluate.add_argument("--concurrency", type=positive, help="searches in flight at once per variant (default 4)")
    evaluate.add_argument("--json", action="store_true", help="print the report as JSON, with per-query values")
    evaluate.set_defaults(func=_evaluate)

    duplicates = client_command(
        "duplicates", "list near-duplicate listings: products whose images nearly copy another product's"
    )
    duplicates.add_argument("--product", metavar="ID", help="this product's duplicates (default: the whole catalogue)")
    duplicates.add_argument(
        "--category",
        action="append",
        default=[],
        help="only products of this category, checked among themselves (repeatable)",
    )
    duplicates.add_argument("--price-min", type=float)
    duplicates.add_argument("--price-max", type=float)
    duplicates.add_argument("--attr", action="append", default=[], help="attribute filter KEY=VALUE (repeatable)")
    duplicates.add_argument(
        "--threshold", type=float, metavar="T", help="the image similarity from which listings are near copies (0.94)"
    )
    duplicates.add_argument(
        "--page-size", type=positive, default=0, metavar="N", help="products checked per call (default 100)"
    )
    duplicates.add_argument("--json", action="store_true", help="print the products and duplicates as JSON")
    duplicates.set_defaults(func=_duplicates)

    info = client_command("info", "show the server's health, model (runtime and CPU), store, cache and limits")
    info.set_defaults(func=_info)

    get = client_command("get", "show one product")
    get.add_argument("id")
    get.set_defaults(func=_get)

    delete = client_command("delete", "delete one product")
    delete.add_argument("id")
    delete.set_defaults(func=_delete)
    return parser


if __name__ == "__main__":
    sys.exit(main())
