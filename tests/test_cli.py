"""The command line as a user runs it: a separate process talking to a real server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from conftest import RunningServer, jpeg_bytes

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
