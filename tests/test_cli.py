"""The command line as a user runs it: a separate process talking to a real server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from conftest import RunningServer, jpeg_bytes
from test_client import render_jpeg, side_by_side

from imagesearch.client import ImageSearchClient, Product, ProductImage
from imagesearch.v1 import image_search_service_pb2 as pb


async def run_cli(*args: str, timeout_s: float = 120) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGESEARCH_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "imagesearch.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_index_reads_folders_jsonl_and_csv_and_reports_failures(running: RunningServer, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "red_mug.jpg").write_bytes(jpeg_bytes((220, 20, 20)))
    (images / "notes.txt").write_text("not an image: ignored in folders")
    (tmp_path / "blue.jpg").write_bytes(jpeg_bytes((20, 20, 220)))
    (tmp_path / "catalogue.jsonl").write_text(
        json.dumps({"id": "j1", "name": "Blue shoe", "category": "shoes", "price": 30, "image": "blue.jpg",
                    "attributes": {"colour": "blue"}}) + "\n"
        + "{not json\n"
        + json.dumps({"id": "j2", "name": "No such image", "image": "missing.jpg"}) + "\n"
        + json.dumps({"id": "j3", "name": "Broken image", "image": "images/notes.txt"}) + "\n"
    )  # fmt: skip
    (tmp_path / "catalogue.csv").write_text(
        "id,name,category,price,currency,image,attributes.colour\nc1,Red mug,mugs,9.5,EUR,images/red_mug.jpg,red\n"
    )
    code, out, err = await run_cli(
        "index", "--target", running.target, "--quiet", "--category", "mugs",
        str(images), str(tmp_path / "catalogue.jsonl"), str(tmp_path / "catalogue.csv"),
    )  # fmt: skip
    assert code == 4, (out, err)  # some products failed
    assert "3 created, 0 updated, 1 failed, 2 unreadable" in out
    assert "catalogue.jsonl:2" in err and "missing.jpg" in err and "j3" in err
    stored = (await running.stub.GetProduct(pb.GetProductRequest(id="c1"))).product
    assert (stored.price, stored.currency, dict(stored.attributes)) == (9.5, "EUR", {"colour": "red"})
    assert (await running.stub.GetProduct(pb.GetProductRequest(id="red_mug"))).product.category == "mugs"


async def test_search_and_get_print_results(running: RunningServer, tmp_path: Path) -> None:
    image = tmp_path / "mug.jpg"
    image.write_bytes(jpeg_bytes((220, 20, 20)))
    assert (await run_cli("index", "--target", running.target, "--quiet", str(image)))[0] == 0
    code, out, _ = await run_cli("search", "--target", running.target, "--image", str(image), "--json")
    assert code == 0
    assert json.loads(out)["hits"][0]["product"]["id"] == "mug"
    code, out, _ = await run_cli("search", "--target", running.target, "--text", "mug", "--category", "none")
    assert code == 0 and out.startswith("0 hits")
    code, out, _ = await run_cli("search", "--target", running.target, "--text", "mug", "--mode", "lexical")
    assert code == 0 and out.startswith("1 hits  (lexical,") and " mug " in out  # the file stem is the name
    code, _, err = await run_cli("get", "--target", running.target, "nope")
    assert code == 4 and "NOT_FOUND" in err


async def test_demo_runs_offline_and_finds_what_it_is_asked_for() -> None:
    code, out, err = await run_cli("demo", "--products", "80")
    assert code == 0, err
    assert "indexed 80 generated products" in out
    first_red_mug_hit = out.split('text: "red mug"')[1].splitlines()[1]
    assert "red mug" in first_red_mug_hit.lower()


# --- several images per product, query regions, near-duplicates, ranking rules (issues #24, #25) -----------------


async def test_index_reads_several_images_and_numeric_attributes(running: RunningServer, tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for name, kind, colour in [("front", "mug", "red"), ("side", "mug", "blue"), ("hat", "hat", "green")]:
        (tmp_path / "img" / f"{name}.jpg").write_bytes(render_jpeg(kind, colour))
    (tmp_path / "catalogue.jsonl").write_text(
        json.dumps({"id": "duo", "numeric_attributes": {"popularity": 1520, "stock": 3},
                    "images": [{"path": "img/front.jpg", "id": "front", "role": "packshot"},
                               {"path": "img/side.jpg", "id": "side", "role": "detail"}]}) + "\n"
        + json.dumps({"id": "bad", "images": [{"path": "img/front.jpg"}, {"role": "detail"}]}) + "\n"
    )  # fmt: skip
    (tmp_path / "catalogue.csv").write_text("id,images,numeric.popularity\ncsv-duo,img/hat.jpg;img/side.jpg,7\n")
    code, out, err = await run_cli(
        "index", "--target", running.target, "--quiet",
        str(tmp_path / "catalogue.jsonl"), str(tmp_path / "catalogue.csv"),
    )  # fmt: skip
    assert code == 4, (out, err)
    assert "2 created, 0 updated, 0 failed, 1 unreadable" in out
    assert "catalogue.jsonl:2" in err and "images[1]" in err
    duo = (await running.stub.GetProduct(pb.GetProductRequest(id="duo"))).product
    assert [(i.id, i.role) for i in duo.images] == [("front", "packshot"), ("side", "detail")]
    assert dict(duo.numeric_attributes) == {"popularity": 1520, "stock": 3}
    csv_duo = (await running.stub.GetProduct(pb.GetProductRequest(id="csv-duo"))).product
    assert len(csv_duo.images) == 2 and dict(csv_duo.numeric_attributes) == {"popularity": 7}


async def test_search_prints_regions_matched_images_duplicates_and_explanations(
    running: RunningServer, tmp_path: Path
) -> None:
    mug, lamp = render_jpeg("mug", "red"), render_jpeg("lamp", "blue")
    async with ImageSearchClient(running.target) as client:
        await client.index_product(
            Product(id="set", images=[ProductImage(id="front"), ProductImage(id="side")]),
            images=[render_jpeg("hat", "green"), lamp],
        )
        await client.index_product(Product(id="mug", numeric_attributes={"popularity": 1000}), mug)
        await client.index_product(Product(id="mug-copy"), mug)
    (tmp_path / "look.jpg").write_bytes(side_by_side(mug, lamp))
    (tmp_path / "mug.jpg").write_bytes(mug)
    (tmp_path / "lamp.jpg").write_bytes(lamp)
    search = ("search", "--target", running.target)

    code, out, err = await run_cli(
        *search, "--image", str(tmp_path / "look.jpg"), "--region", "0,0,0.5,1", "--region", "0.5,0,1,1", "--top-k", "1"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("2 regions  (dense,")
    assert lines[1] == "region 0,0,0.5,1: 1 hits" and (" mug " in lines[2] or " mug-copy " in lines[2])
    assert lines[3] == "region 0.5,0,1,1: 1 hits" and " set " in lines[4]

    code, out, err = await run_cli(*search, "--image", str(tmp_path / "lamp.jpg"), "--top-k", "1", "--explain")
    assert code == 0, err
    assert " set " in out.splitlines()[1]
    assert out.splitlines()[2].split()[:4] == ["image", "1", "'side'", "relevance"]

    code, out, err = await run_cli(*search, "--image", str(tmp_path / "mug.jpg"), "--collapse-duplicates")
    assert code == 0, err
    assert "duplicates: mug" in out  # "mug-copy" collapsed into "mug", or the other way round

    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"rules": [{"name": "popular", "field": "popularity", "weight": 0.001}]}))
    code, out, err = await run_cli(*search, "--text", "red mug", "--mode", "dense", "--rules", str(rules), "--explain")
    assert code == 0, err
    assert "popular: f=1000 +1.0000" in out and "popular: f=0 +0.0000" in out

    rules.write_text('{"rules": [{"feild": "popularity"}]}')
    code, _, err = await run_cli(*search, "--text", "red mug", "--rules", str(rules))
    assert code == 2 and str(rules) in err
    code, _, err = await run_cli(*search, "--text", "red mug", "--duplicate-threshold", "0.9")
    assert code == 2 and "--collapse-duplicates" in err
    code, _, err = await run_cli(*search, "--image", str(tmp_path / "mug.jpg"), "--region", "0,0,2")
    assert code == 2 and "x0,y0,x1,y1" in err
    code, _, err = await run_cli(*search, "--image", str(tmp_path / "mug.jpg"), "--region", "0,0,2,1")
    assert code == 4 and "INVALID_ARGUMENT" in err  # outside 0..1: the server's rule, named by the server


async def test_duplicates_lists_each_product_with_its_near_copies(running: RunningServer) -> None:
    mug = render_jpeg("mug", "red")
    async with ImageSearchClient(running.target) as client:
        await client.index_product(Product(id="mug-1", category="mugs"), mug)
        await client.index_product(
            Product(id="mug-2", category="mugs", images=[ProductImage(id="a"), ProductImage(id="b")]),
            images=[render_jpeg("hat", "blue"), mug],
        )
        await client.index_product(Product(id="shoe", category="shoes"), render_jpeg("shoe", "green"))
    duplicates = ("duplicates", "--target", running.target)

    code, out, err = await run_cli(*duplicates, "--page-size", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[-1] == "2 products with duplicates"
    assert "mug-1: 1 duplicate" in lines and "mug-2: 1 duplicate" in lines
    under_mug_1 = lines[lines.index("mug-1: 1 duplicate") + 1].split()
    assert under_mug_1[:2] == ["mug-2", "similarity"] and under_mug_1[3:] == [
        "image",
        "0",
        "~",
        "its",
        "image",
        "1",
        "exact",
    ]
    under_mug_2 = lines[lines.index("mug-2: 1 duplicate") + 1].split()
    assert under_mug_2[0] == "mug-1" and under_mug_2[3:] == ["image", "1", "~", "its", "image", "0", "exact"]

    code, out, _ = await run_cli(*duplicates, "--product", "shoe")
    assert code == 0 and out.strip() == "shoe: no duplicates"
    code, out, _ = await run_cli(*duplicates, "--category", "shoes", "--json")
    assert code == 0 and json.loads(out) == {"products": []}
    code, out, _ = await run_cli(*duplicates, "--product", "mug-1", "--json")
    [entry] = json.loads(out)["products"]
    assert entry["product_id"] == "mug-1" and entry["duplicates"][0]["product_id"] == "mug-2"
    code, _, err = await run_cli(*duplicates, "--product", "nope")
    assert code == 4 and "NOT_FOUND" in err


async def test_info_prints_the_runtime_and_the_new_limits(running: RunningServer) -> None:
    code, out, err = await run_cli("info", "--target", running.target)
    assert code == 0, err
    info = json.loads(out)
    assert info["health"] == "SERVING"
    assert info["model"]["runtimeReason"] and "cpu" in info["model"]
    assert (info["limits"]["maxImagesPerProduct"], info["limits"]["maxQueryRegions"]) == (10, 8)
