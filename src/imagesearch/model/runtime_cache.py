"""The runtime cache: converted towers (OpenVINO IR) on disk, and the runtime choices measured on this CPU.

Layout of the cache directory (data_dir/runtime-cache):

    openvino-<kind>-<key[:40]>/   model.xml, model.bin and manifest.json (the key, each file's size and sha256)
    choice-<key[:40]>.json        a runtime choice measured at a start (runtime_choice.py)
    .tmp-*                        entries being written, moved into place with one rename

An entry's key is a sha256 over everything the IR depends on: every weight byte, the module structure, the input
size, the torch / open_clip / onnx / OpenVINO (/ NNCF) versions, the opset, the IR's precision and our format
version, so another model, weights file, runtime version or quantisation never reuses an entry. The IR's precision
is f32 or int8: f32 and bf16 (and f16) towers are compiled from one f32 IR, the precision being a compile option.

An entry is verified at every use (a flipped byte in the weights would otherwise serve wrong vectors silently); a
damaged one is logged, moved aside and rebuilt. The cache is best effort: where it cannot be written, the tower is
built in the system's temp dir and served from memory. Entries and choices no start has used for 30 days are
deleted by the next start that looks at the cache (a start marks what it uses: the mtime).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

log = structlog.get_logger(__name__)

# Bump when anything we write into an entry, or how we build it, changes: old entries then stop matching.
CACHE_FORMAT_VERSION = 1
# The ONNX opset the towers are exported with (openvino_runtime.py): part of every key.
ONNX_OPSET = 17
_MANIFEST = "manifest.json"
XML = "model.xml"
_BIN = "model.bin"
# Half-written entries left by a build that was killed; older than this, nobody is still writing them.
_STALE_TEMP_S = 3600.0
# An entry no start has used for this long is deleted by the next start that looks at the cache: every change of
# model, weights, versions or precision leaves the old entry behind (~350 MB for a ViT-B-32 image tower), and a
# rollback within a month still finds its entry.
_UNUSED_ENTRY_S = 30 * 24 * 3600.0


@dataclass(frozen=True)
class CacheOutcome:
    """How a tower's IR was obtained at build time: for logs, the start-up report and tests."""

    key: str
    path: Path
    hit: bool  # True: read from the cache; False: exported and converted now (and stored)
    rebuilt_reason: str | None  # why an existing entry was not used (damaged); None when there was none
    stored: bool  # whether the entry is in the cache now (False: the cache directory could not be written)
    seconds: float  # fingerprint, export + convert (or verify + read), and compile when built by `build()`


def cache_key(module: nn.Module, *, kind: str, precision: str, extra: Mapping[str, object]) -> str:
    """sha256 over everything a converted tower depends on (see the module docstring). `precision` is the IR's:
    "f32" (compiled later at any float precision) or "int8" (quantised)."""
    import openvino as ov

    parts = {
        "format": CACHE_FORMAT_VERSION,
        "kind": kind,
        "opset": ONNX_OPSET,
        "precision": precision,
        "openvino": ov.get_version(),
        "torch": torch.__version__,
        "open_clip": version("open_clip_torch"),
        "onnx": version("onnx"),
        "structure": _structure(module),
        "weights": weights_fingerprint(module),
        "extra": extra,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over every parameter's and buffer's name, dtype, shape and bytes.

    All the bytes, not a sample: it costs ~0.2 s for ViT-B-32's image tower (350 MB) on a 2-core EPYC, and a
    fine-tuned checkpoint can differ from its base in few enough values that a sample could miss them.
    """
    digest = hashlib.sha256()
    tensors = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}\n".encode())
        # Viewed as bytes, so every dtype (bf16 included, which numpy lacks) hashes the same way.
        digest.update(value.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def load_or_convert(
    core: Any, cache_dir: Path, *, kind: str, key: str, convert: Callable[[Path], Any]
) -> tuple[Any, CacheOutcome]:
    """The IR for `key`: read from its verified entry, or made by `convert(scratch_dir)` (export, convert, quantise:
    the caller's) and stored. Tidies the cache on the way (stale temps, entries unused for a month). The outcome's
    `seconds` is this call's."""
    started = time.perf_counter()
    _remove_stale_temps(cache_dir)
    entry = cache_dir / f"openvino-{kind}-{key[:40]}"
    _remove_unused(cache_dir, keep=entry)
    model: Any = None
    rebuilt_reason: str | None = None
    if entry.exists():
        try:
            _verify_entry(entry, key)
            model = core.read_model(str(entry / XML))
            mark_used(entry)
        except Exception as exc:  # a damaged entry (truncated, edited, half-deleted) must never stop a start
            rebuilt_reason = f"{type(exc).__name__}: {exc}"
            log.warning("openvino_cache_entry_unusable", path=str(entry), reason=rebuilt_reason)
    hit = stored = model is not None
    if model is None:
        model, stored = _convert_and_store(convert, key, entry, rebuilt_reason)
    return model, CacheOutcome(key, entry, hit, rebuilt_reason, stored, time.perf_counter() - started)


def read_choice(cache_dir: Path, key: str) -> dict[str, Any] | None:
    """The runtime choice stored under `key`, marked as used; None when there is none or it cannot be read."""
    path = cache_dir / f"choice-{key[:40]}.json"
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("key") != key:
        return None
    mark_used(path)
    return record


def write_choice(cache_dir: Path, key: str, record: Mapping[str, Any]) -> bool:
    """Store a runtime choice under `key` (atomically: a reader sees the whole record or none). Returns whether it
    was stored; a cache that cannot be written means the next start measures again."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache_dir, prefix=".tmp-", suffix=".json", delete=False) as handle:
            json.dump({"key": key, **record}, handle, indent=1)
        os.replace(handle.name, cache_dir / f"choice-{key[:40]}.json")
        return True
    except OSError as exc:
        log.warning("runtime_choice_not_stored", path=str(cache_dir), error=str(exc))
        return False


def mark_used(path: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only cache: its entries are never pruned by this server either
        os.utime(path)


def _structure(module: nn.Module) -> str:
    """The module tree with each submodule's class and its plain settings (pooling, LayerNorm eps, activation,
    heads...): what the exported graph depends on besides the weights, read from the loaded model itself rather
    than from a config file it may have been built from with other defaults."""
    lines = []
    for name, sub in module.named_modules():
        settings = {
            k: v
            for k, v in sorted(vars(sub).items())
            if not k.startswith("_") and k != "training" and isinstance(v, int | float | str | bool | tuple | None)
        }
        lines.append(f"{name}:{type(sub).__module__}.{type(sub).__qualname__}:{settings!r}")
    return "\n".join(lines)


def _convert_and_store(convert: Callable[[Path], Any], key: str, entry: Path, damaged: str | None) -> tuple[Any, bool]:
    """convert() in a temp dir beside the entry, save, then move it into place with one rename: a reader sees a
    complete entry or none. Returns the converted model, and whether it was stored. Where the cache cannot be
    written (read-only volume, disk full), converts in the system's temp dir, and the next start converts again."""
    import openvino as ov

    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        temp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
        storing = True
    except OSError as exc:
        log.warning("openvino_cache_unwritable", path=str(entry.parent), error=str(exc))
        temp, storing = Path(tempfile.mkdtemp(prefix="imagesearch-openvino-")), False
    try:
        scratch = temp / "scratch"
        scratch.mkdir()
        model = convert(scratch)
        if storing:
            try:
                # fp32 weights in the IR: precision is chosen when compiling; fp16 weights would cost accuracy.
                ov.save_model(model, str(temp / XML), compress_to_fp16=False)
                shutil.rmtree(scratch)
                manifest = {"key": key, "files": {name: _file_record(temp / name) for name in (XML, _BIN)}}
                (temp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
                _move_into_place(temp, entry, replace=damaged is not None)
            except (OSError, RuntimeError) as exc:  # OpenVINO reports a failed write as RuntimeError
                log.warning("openvino_cache_not_stored", path=str(entry), error=f"{type(exc).__name__}: {exc}")
                storing = False
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return model, storing


def _file_record(path: Path) -> dict[str, object]:
    with path.open("rb") as handle:
        return {"size": path.stat().st_size, "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}


def _verify_entry(entry: Path, key: str) -> None:
    """Raise unless `entry` is complete and its files are byte for byte what was written (~0.2 s for ViT-B-32)."""
    manifest = json.loads((entry / _MANIFEST).read_text())
    if manifest.get("key") != key:
        raise ValueError("manifest key does not match the entry's name")
    for name, expected in manifest["files"].items():
        path = entry / name
        if path.stat().st_size != expected["size"]:
            raise ValueError(f"{name} is {path.stat().st_size} bytes, expected {expected['size']}")
        if _file_record(path) != expected:
            raise ValueError(f"{name} does not match its recorded sha256")


def _move_into_place(temp: Path, entry: Path, *, replace: bool) -> None:
    if replace and entry.exists():
        _discard(entry)  # a damaged entry
    try:
        os.replace(temp, entry)
    except OSError:
        if not entry.is_dir():
            raise
        # Another process stored the same entry meanwhile (the rename found a non-empty directory); theirs is
        # equivalent, and this process keeps using the model it converted.
        log.info("openvino_cache_entry_raced", path=str(entry))


def _discard(entry: Path) -> None:
    """Delete a cache entry: moved aside first (a rename is atomic; deleting 350 MB is not), so that another start
    never reads half an entry, then deleted."""
    trash = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    os.replace(entry, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


def _remove_unused(cache_dir: Path, *, keep: Path) -> None:
    now = time.time()
    found = [*cache_dir.glob("openvino-*"), *cache_dir.glob("choice-*.json")] if cache_dir.is_dir() else []
    for entry in found:
        try:
            unused_s = now - entry.stat().st_mtime
            if entry == keep or unused_s <= _UNUSED_ENTRY_S:
                continue
            if entry.is_dir():
                _discard(entry)
            else:
                entry.unlink()
            log.info("openvino_cache_entry_removed", path=str(entry), unused_days=round(unused_s / 86400))
        except OSError:
            continue  # removed by another process meanwhile, or a read-only cache


def _remove_stale_temps(cache_dir: Path) -> None:
    now = time.time()
    for temp in cache_dir.glob(".tmp-*") if cache_dir.is_dir() else []:
        try:
            if now - temp.stat().st_mtime > _STALE_TEMP_S:
                if temp.is_dir():
                    shutil.rmtree(temp, ignore_errors=True)
                else:
                    temp.unlink()
        except OSError:
            continue  # removed by another process meanwhile
