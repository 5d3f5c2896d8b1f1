"""The OpenVINO runtime (model/openvino_runtime.py): agreement with torch fp32 for each precision, dynamic batch,
the text tower, the conversion cache (reuse, keys, damaged entries) and the precision choice.

The models come straight from open_clip, not through ClipEncoder, so the torch reference is the model's own
encode_image / encode_text, run on the very module object the runtime was derived from.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch

pytest.importorskip("openvino")  # the whole module: the runtime is optional where OpenVINO is absent

import open_clip

import imagesearch
from imagesearch.errors import ModelLoadError
from imagesearch.model import openvino_runtime
from imagesearch.model.calibration import Calibration
from imagesearch.model.openvino_runtime import (
    OpenVinoImageTower,
    OpenVinoTextTower,
    Precision,
    compile_config,
    cpu_has_native_bf16,
    cpuinfo_has_bf16,
    resolve_precision,
)
from imagesearch.model.runtime_cache import cache_key
from imagesearch.synthetic.calibration import CALIBRATION_SET, calibration_images
from imagesearch.synthetic.renderer import COLOURS, KINDS, PATTERNS, render

SYNTHETIC_DIR = Path(imagesearch.__file__).parent / "models" / "synthetic-clip"
# Cosine to torch fp32, per precision: f32 is the same arithmetic reordered; bf16 keeps 8 bits of mantissa.
Tested = Literal["f32", "bf16"]
MIN_COSINE = {"f32": 0.9999, "bf16": 0.999}
TEXTS = [
    "a red mug",
    "striped blue t-shirt on a white background, photographed from above",
    "x",
    "word " * 200,  # longer than the context: truncated
]


def need_precision(precision: str) -> None:
    if precision == "bf16" and not cpu_has_native_bf16():
        pytest.skip("bf16 skipped: this CPU has no native bf16 (AVX512_BF16 or AMX)")


@pytest.fixture(scope="module")
def synthetic() -> tuple[Any, Any, Any]:
    """The bundled trained model: (model, preprocess, tokenizer)."""
    name = f"local-dir:{SYNTHETIC_DIR}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@pytest.fixture(scope="module")
def vit_b_32() -> tuple[Any, Any]:
    """ViT-B-32 with random weights: the real architecture's graph (agreement only, rankings are meaningless)."""
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    return model.eval(), preprocess


def renders(preprocess: Any, count: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    images = [render(rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(PATTERNS), rng) for _ in range(count)]
    return torch.stack([preprocess(image) for image in images])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runtime-cache")


@pytest.fixture(scope="module")
def image_tower(cache_dir: Path, synthetic: tuple[Any, Any, Any]) -> Callable[[Precision], OpenVinoImageTower]:
    """The synthetic model's image tower at a precision, built once per module."""
    built: dict[str, OpenVinoImageTower] = {}

    def get(precision: Precision) -> OpenVinoImageTower:
        need_precision(precision)
        if precision not in built:
            built[precision] = OpenVinoImageTower.build(
                synthetic[0].visual,
                cache_dir=cache_dir,
                precision=precision,
                preprocess=synthetic[1],
                calibration=Calibration(CALIBRATION_SET, calibration_images),
            )
        return built[precision]

    return get


def torch_image(model: Any, pixels: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        features: torch.Tensor = model.encode_image(pixels, normalize=True)
    return features.numpy()


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b, axis=1).min())


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_image_tower_matches_torch_fp32_on_trained_model(
    precision: Tested, synthetic: tuple[Any, Any, Any], image_tower: Callable[[Precision], OpenVinoImageTower]
) -> None:
    tower = image_tower(precision)
    pixels = renders(synthetic[1], 16, seed=1)
    embeddings = tower(pixels)
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (16, tower.dimension)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert min_cosine(embeddings, torch_image(synthetic[0], pixels)) >= MIN_COSINE[precision]
    assert tower.precision == precision


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_image_tower_matches_torch_fp32_on_vit_b_32(
    precision: Tested, vit_b_32: tuple[Any, Any], cache_dir: Path
) -> None:
    need_precision(precision)
    model, preprocess = vit_b_32
    tower = OpenVinoImageTower.build(model.visual, cache_dir=cache_dir, precision=precision)
    pixels = renders(preprocess, 16, seed=2)
    reference = torch_image(model, pixels)
    batched = tower(pixels)
    assert min_cosine(batched, reference) >= MIN_COSINE[precision]
    one_by_one = np.concatenate([tower(pixels[i : i + 1]) for i in range(len(pixels))])
    np.testing.assert_allclose(one_by_one, batched, atol=1e-3)


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_image_tower_gives_the_same_vectors_in_a_batch_of_1_and_of_16(
    precision: Tested, synthetic: tuple[Any, Any, Any], image_tower: Callable[[Precision], OpenVinoImageTower]
) -> None:
    tower = image_tower(precision)
    pixels = renders(synthetic[1], 16, seed=3)
    one_by_one = np.concatenate([tower(pixels[i : i + 1]) for i in range(16)])
    np.testing.assert_allclose(one_by_one, tower(pixels), atol=1e-3)


def test_image_tower_takes_any_batch_size_and_numpy_input(
    synthetic: tuple[Any, Any, Any], image_tower: Callable[[Precision], OpenVinoImageTower]
) -> None:
    tower = image_tower("f32")
    pixels = renders(synthetic[1], 32, seed=4)
    reference = torch_image(synthetic[0], pixels)
    for size in (1, 3, 32):
        assert min_cosine(tower(pixels[:size].numpy()), reference[:size]) >= MIN_COSINE["f32"]
    assert tower(pixels[:0]).shape == (0, tower.dimension)


def test_image_tower_rejects_pixels_of_another_size(image_tower: Callable[[Precision], OpenVinoImageTower]) -> None:
    tower = image_tower("f32")
    with pytest.raises(ValueError, match="pixels must be"):
        tower(torch.zeros(1, 3, tower.image_size + 1, tower.image_size + 1))


def test_second_build_reuses_the_cache_entry(tmp_path: Path, synthetic: tuple[Any, Any, Any]) -> None:
    first = OpenVinoImageTower.build(synthetic[0].visual, cache_dir=tmp_path, precision="f32")
    second = OpenVinoImageTower.build(synthetic[0].visual, cache_dir=tmp_path, precision="f32")
    assert not first.cache.hit
    assert second.cache.hit
    assert second.cache.key == first.cache.key
    assert second.cache.rebuilt_reason is None
    assert first.cache.stored and second.cache.stored
    assert [p.name for p in tmp_path.iterdir()] == [first.cache.path.name]  # no temp dirs left behind


def test_unwritable_cache_dir_still_builds_the_tower(tmp_path: Path, synthetic: tuple[Any, Any, Any]) -> None:
    (tmp_path / "a-file").write_text("")
    tower = OpenVinoImageTower.build(synthetic[0].visual, cache_dir=tmp_path / "a-file" / "cache", precision="f32")
    assert not tower.cache.hit
    assert not tower.cache.stored
    pixels = renders(synthetic[1], 4, seed=7)
    assert min_cosine(tower(pixels), torch_image(synthetic[0], pixels)) >= MIN_COSINE["f32"]


def test_cache_key_differs_by_ir_precision_weights_and_input_size(synthetic: tuple[Any, Any, Any]) -> None:
    visual = synthetic[0].visual
    extra = {"image_size": 48}
    f32 = cache_key(visual, kind="image", precision="f32", extra=extra)
    assert cache_key(visual, kind="image", precision="int8", extra=extra) != f32
    assert cache_key(visual, kind="image", precision="f32", extra=extra) == f32  # deterministic
    assert cache_key(visual, kind="image", precision="f32", extra={"image_size": 64}) != f32
    assert cache_key(visual, kind="text", precision="f32", extra=extra) != f32
    nudged = copy.deepcopy(visual)
    with torch.no_grad():
        next(iter(nudged.parameters())).view(-1)[0] += 1e-6  # one value of millions
    assert cache_key(nudged, kind="image", precision="f32", extra=extra) != f32


def test_float_precisions_share_one_entry_and_int8_has_its_own(
    synthetic: tuple[Any, Any, Any], image_tower: Callable[[Precision], OpenVinoImageTower]
) -> None:
    # The IR holds fp32 weights; f32 and bf16 are compile options over it. int8 is another graph.
    need_precision("bf16")
    assert image_tower("bf16").cache.path == image_tower("f32").cache.path
    int8 = OpenVinoImageTower.conversion(
        synthetic[0].visual,
        cache_dir=image_tower("f32").cache.path.parent,
        int8=True,
        preprocess=synthetic[1],
        calibration=Calibration(CALIBRATION_SET, calibration_images),
    )
    assert int8.key != image_tower("f32").cache.key


def damage_weights(entry: Path) -> None:
    weights = entry / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(damage_weights, id="bytes-changed"),
        pytest.param(lambda entry: (entry / "model.bin").write_bytes(b"\0" * 100), id="weights-truncated"),
        pytest.param(lambda entry: (entry / "model.xml").write_text("<net"), id="graph-garbled"),
        pytest.param(lambda entry: (entry / "manifest.json").unlink(), id="manifest-missing"),
    ],
)
def test_damaged_cache_entry_is_rebuilt_and_still_agrees(
    damage: Callable[[Path], object],
    tmp_path: Path,
    cache_dir: Path,
    synthetic: tuple[Any, Any, Any],
    image_tower: Callable[[Precision], OpenVinoImageTower],
) -> None:
    pristine = image_tower("f32").cache.path
    shutil.copytree(pristine, tmp_path / pristine.name)
    damage(tmp_path / pristine.name)
    rebuilt = OpenVinoImageTower.build(synthetic[0].visual, cache_dir=tmp_path, precision="f32")
    assert not rebuilt.cache.hit
    assert rebuilt.cache.rebuilt_reason is not None
    pixels = renders(synthetic[1], 8, seed=5)
    assert min_cosine(rebuilt(pixels), torch_image(synthetic[0], pixels)) >= MIN_COSINE["f32"]
    again = OpenVinoImageTower.build(synthetic[0].visual, cache_dir=tmp_path, precision="f32")
    assert again.cache.hit


@pytest.mark.parametrize("precision", ["f32", "bf16"])
def test_text_tower_matches_torch_fp32_for_any_length_and_batch(
    precision: Tested, cache_dir: Path, synthetic: tuple[Any, Any, Any]
) -> None:
    need_precision(precision)
    model, _, tokenizer = synthetic
    assert OpenVinoTextTower.supports(model)
    tower = OpenVinoTextTower.build(model, cache_dir=cache_dir, precision=precision)
    tokens = tokenizer(TEXTS)
    with torch.inference_mode():
        reference = model.encode_text(tokens, normalize=True).numpy()
    batched = tower(tokens)
    assert min_cosine(batched, reference) >= MIN_COSINE[precision]
    one_by_one = np.concatenate([tower(tokens[i : i + 1]) for i in range(len(TEXTS))])
    np.testing.assert_allclose(one_by_one, batched, atol=1e-3)


@pytest.mark.slow
def test_int8_image_tower_stays_close_to_fp32_on_trained_model(
    synthetic: tuple[Any, Any, Any], image_tower: Callable[[Precision], OpenVinoImageTower]
) -> None:
    pytest.importorskip("nncf")
    tower = image_tower("int8")
    pixels = renders(synthetic[1], 64, seed=6)  # other images than the calibration set (seed 0)
    assert tower.precision == "int8"
    assert min_cosine(tower(pixels), torch_image(synthetic[0], pixels)) >= 0.999


def test_int8_needs_the_preprocess_transform(tmp_path: Path, synthetic: tuple[Any, Any, Any]) -> None:
    with pytest.raises(ModelLoadError, match="preprocess"):
        OpenVinoImageTower.build(synthetic[0].visual, cache_dir=tmp_path, precision="int8")


def test_build_refuses_a_torch_quantised_tower(tmp_path: Path, synthetic: tuple[Any, Any, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao is deprecated for torchao; still works
        quantised = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(synthetic[0].visual), {torch.nn.Linear}, dtype=torch.qint8
        )
    with pytest.raises(ModelLoadError, match="torch-quantised"):
        OpenVinoImageTower.build(quantised, cache_dir=tmp_path, precision="f32")


@pytest.mark.parametrize(
    ("native", "requested", "expected"),
    [
        pytest.param(True, "auto", "bf16", id="auto-with-bf16"),
        pytest.param(False, "auto", "f32", id="auto-without-bf16"),
        pytest.param(True, "bf16", "bf16", id="bf16-with-bf16"),
        pytest.param(False, "f32", "f32", id="f32"),
        pytest.param(False, "int8", "int8", id="int8"),
    ],
)
def test_resolve_precision(monkeypatch: pytest.MonkeyPatch, native: bool, requested: str, expected: str) -> None:
    monkeypatch.setattr(openvino_runtime, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision(requested) == expected


@pytest.mark.parametrize(
    ("requested", "int8_allowed"),
    [
        pytest.param("bf16", True, id="bf16-without-bf16"),
        pytest.param("fp64", True, id="unknown"),
        pytest.param("int8", False, id="int8-not-offered"),
    ],
)
def test_resolve_precision_refuses(monkeypatch: pytest.MonkeyPatch, requested: str, int8_allowed: bool) -> None:
    monkeypatch.setattr(openvino_runtime, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(ModelLoadError):
        resolve_precision(requested, int8_allowed=int8_allowed)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        pytest.param("fpu avx2 avx512f avx512_bf16 avx512_vnni", True, id="avx512-bf16"),
        pytest.param("fpu avx2 amx_bf16 amx_tile", True, id="amx"),
        pytest.param("fpu avx2 fma", False, id="avx2-only"),
    ],
)
def test_cpuinfo_bf16_flags(tmp_path: Path, flags: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpuinfo_has_bf16(cpuinfo) is expected
    assert cpuinfo_has_bf16(tmp_path / "absent") is False


def test_entries_unused_for_a_month_are_removed_and_used_ones_kept(
    tmp_path: Path, synthetic: tuple[Any, Any, Any]
) -> None:
    first = OpenVinoImageTower.build(synthetic[0].visual, cache_dir=tmp_path, precision="f32")
    day = 24 * 3600
    old, recent = tmp_path / "openvino-image-0ld", tmp_path / "openvino-text-recent"
    for entry, age_s in ((old, 31 * day), (recent, 29 * day), (first.cache.path, 62 * day)):
        entry.mkdir(exist_ok=True)
        os.utime(entry, (time.time() - age_s,) * 2)
    # A runtime choice (runtime_choice.py) no start has read for a month goes the same way.
    old_choice = tmp_path / "choice-0ld.json"
    old_choice.write_text("{}")
    os.utime(old_choice, (time.time() - 31 * day,) * 2)
    # The entry in use is kept however old its mark (and marked again); another one unused for a month goes.
    second = OpenVinoImageTower.build(synthetic[0].visual, cache_dir=tmp_path, precision="f32")
    assert second.cache.hit
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.cache.path.name, recent.name])
    assert time.time() - first.cache.path.stat().st_mtime < 3600


@pytest.mark.parametrize(
    ("threads", "physical", "hyper_threading"),
    [
        pytest.param(2, 2, False, id="one-thread-per-core"),
        pytest.param(2, 1, True, id="both-hyper-threads-of-one-core"),
    ],
)
def test_compile_config_states_precision_threads_and_hyper_threading(
    monkeypatch: pytest.MonkeyPatch, threads: int, physical: int, hyper_threading: bool
) -> None:
    monkeypatch.setattr(openvino_runtime, "physical_cores", lambda: physical)
    config = compile_config("bf16", threads)
    assert config["INFERENCE_NUM_THREADS"] == threads
    assert config["INFERENCE_PRECISION_HINT"] == "bf16"
    assert config["ENABLE_HYPER_THREADING"] is hyper_threading
    # Never pinned: the model's threads share the CPUs with decoding, gRPC and other processes.
    assert config["ENABLE_CPU_PINNING"] is False
    assert compile_config("int8", 1)["INFERENCE_PRECISION_HINT"] == "f32"


def test_tower_compiled_at_two_thread_counts_gives_the_same_vectors(
    synthetic: tuple[Any, Any, Any], cache_dir: Path
) -> None:
    converted = OpenVinoImageTower.conversion(synthetic[0].visual, cache_dir=cache_dir).run()
    one, two = (OpenVinoImageTower.compile(converted, precision="f32", threads=n) for n in (1, 2))
    assert (one.threads, two.threads) == (1, 2)
    pixels = renders(synthetic[1], 4, seed=8)
    np.testing.assert_allclose(one(pixels), two(pixels), atol=1e-4)
    with pytest.raises(ValueError, match="cannot compile"):
        OpenVinoTextTower.compile(converted, precision="f32")
