"""Train a small open_clip CLIP from scratch on synthetic catalogue renders (`imagesearch.synthetic`).

The result is an open_clip `local-dir` model (open_clip_config.json + open_clip_model.safetensors) that only knows
the synthetic catalogue: 8 kinds x 10 colours x 3 patterns. It exists so that tests can check search relevance
with a real CLIP without downloading pretrained weights.

    .venv/bin/python tools/train_synthetic_clip.py --steps 1000 --seed 0 --threads 2

Same seed + same thread count -> bitwise-identical weights (checked); another thread count drifts by ~1e-5.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import Compose, Normalize

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from imagesearch.synthetic import renderer as synthetic  # noqa: E402

DEFAULT_OUT = REPO / "src" / "imagesearch" / "models" / "synthetic-clip"

# 48 px with 8 px patches trained better per minute than 64 px in the trial (ENVIRONMENT.md). Most parameters sit
# in the token embedding, which the stock 49408-token SimpleTokenizer vocabulary forces on us.
MODEL_CFG: dict[str, Any] = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 48, "patch_size": 8, "width": 128, "layers": 3, "head_width": 32, "pool_type": "avg"},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 2},
}

# "squash" resizes the whole picture to 48x48 without a centre crop, so nothing near the edge of a non-square
# upload is cut off. Catalogue renders are square, where it equals the default shortest-edge resize + crop.
PREPROCESS_CFG: dict[str, Any] = {
    "size": 48,
    "mean": list(open_clip.OPENAI_DATASET_MEAN),
    "std": list(open_clip.OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "squash",
}

RENDER_SIZE = 128  # what the catalogue (and the service's tests) feed the model, before preprocessing
CLASSES: list[tuple[str, str]] = [(colour, kind) for colour in synthetic.COLOURS for kind in synthetic.KINDS]
_CHUNK = 1000


def preprocess_without_normalize() -> Compose:
    """open_clip's own inference transform for PREPROCESS_CFG, minus Normalize, so renders can be stored as uint8.

    Training on exactly the transform the served model applies (resize filter included) avoids a train/serve gap.
    """
    full = image_transform_v2(PreprocessCfg(**PREPROCESS_CFG), is_train=False)
    return Compose([t for t in full.transforms if not isinstance(t, Normalize)])


def _render_chunk(args: tuple[int, int, int]) -> tuple[np.ndarray, list[str]]:
    # One chunk per (seed, chunk index): the dataset does not depend on how many processes render it.
    seed, start, count = args
    torch.set_num_threads(1)
    rng = random.Random(seed * 1_000_003 + start)
    transform = preprocess_without_normalize()
    size = PREPROCESS_CFG["size"]
    pixels = np.empty((count, 3, size, size), dtype=np.uint8)
    patterns: list[str] = []
    for j in range(count):
        colour, kind = CLASSES[(start + j) % len(CLASSES)]
        pattern = rng.choice(synthetic.PATTERNS)
        image = synthetic.render(kind, colour, pattern, rng, RENDER_SIZE)
        # The service sees JPEG uploads; train on their artefacts too.
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(70, 95))
        decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        tensor = transform(decoded)
        pixels[j] = (tensor * 255.0).round().to(torch.uint8).numpy()
        patterns.append(pattern)
    return pixels, patterns


def render_dataset(n: int, seed: int, workers: int) -> tuple[torch.Tensor, list[str]]:
    """`n` preprocessed renders as uint8 (n, 3, 48, 48); image i has class CLASSES[i % 80]."""
    jobs = [(seed, start, min(_CHUNK, n - start)) for start in range(0, n, _CHUNK)]
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.map(_render_chunk, jobs)
    else:
        results = [_render_chunk(job) for job in jobs]
    pixels = torch.from_numpy(np.concatenate([r[0] for r in results]))
    patterns = [p for r in results for p in r[1]]
    return pixels, patterns


class CaptionTokens:
    """Tokenises captions once each: the template x synonym space is small, so the cache stays small too."""

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for text, row in zip(missing, self._tokenizer(missing), strict=True):
                self._cache[text] = row
        return torch.stack([self._cache[t] for t in texts])


def sample_batch(n_images: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of one image of every class plus random extras: every class is a negative in every batch."""
    n_classes = len(CLASSES)
    per_class = n_images // n_classes
    first = torch.arange(n_classes) + n_classes * torch.randint(per_class, (n_classes,), generator=gen)
    extra = torch.randint(per_class * n_classes, (batch_size - n_classes,), generator=gen)
    return torch.cat([first, extra])


def lr_at(step: int, steps: int, base_lr: float, warmup: int) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Decay matrices only: decaying gains, biases, embeddings' scale and logit_scale hurts CLIP training.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )


def quick_eval(
    model: open_clip.CLIP, tokens: CaptionTokens, pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> tuple[float, float]:
    """(zero-shot accuracy, text->image P@5) on held-out renders, for the training log only."""
    model.eval()
    with torch.no_grad():
        img = model.encode_image((pixels.float() / 255.0 - mean) / std, normalize=True)
        txt = model.encode_text(tokens([f"a photo of a {c} {k}" for c, k in CLASSES]), normalize=True)
    model.train()
    labels = torch.arange(len(pixels)) % len(CLASSES)
    zero_shot = (img @ txt.T).argmax(dim=1).eq(labels).float().mean().item()
    top5 = (txt @ img.T).topk(5, dim=1).indices
    p_at_5 = labels[top5].eq(torch.arange(len(CLASSES))[:, None]).float().mean().item()
    return zero_shot, p_at_5


def save_model(model: open_clip.CLIP, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    # fp16 halves the file; open_clip upcasts on load and rankings come out the same (checked below).
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))


def check_saved(out: Path, model: open_clip.CLIP, pixels: torch.Tensor) -> None:
    """Reload exactly as a user would and check that the fp16 copy ranks like the fp32 weights."""
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    loaded.eval()
    model.eval()
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    images = (pixels.float() / 255.0 - mean) / std
    texts = tokenizer([f"a photo of a {c} {k}" for c, k in CLASSES])
    with torch.no_grad():
        scores = [
            m.encode_image(images, normalize=True) @ m.encode_text(texts, normalize=True).T for m in (model, loaded)
        ]
    # Compare what search returns: the best prompt per image and the top-5 images per prompt (as sets, since
    # near-ties may swap places inside the top 5 without changing the results).
    same_top1 = scores[0].argmax(dim=1).eq(scores[1].argmax(dim=1)).float().mean().item()
    top5 = [{(i, frozenset(row)) for i, row in enumerate(s.T.topk(5, dim=1).indices.tolist())} for s in scores]
    same_top5 = len(top5[0] & top5[1]) / len(top5[0])
    print(f"reloaded via local-dir: preprocess={preprocess}", flush=True)
    print(
        f"fp16 vs fp32: zero-shot top-1 identical {same_top1:.4f}, text->image top-5 sets identical {same_top5:.4f}",
        flush=True,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data, init and sampling (default 0)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="local-dir model folder to write")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and render processes (default 2)")
    parser.add_argument("--images", type=int, default=40_000, help="pre-rendered training images (default 40000)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size, >= 80 classes (default 128)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on matrices (default 0.1)")
    parser.add_argument("--log-every", type=int, default=100, help="steps between log lines (default 100)")
    args = parser.parse_args(argv)
    if args.batch_size < len(CLASSES):
        parser.error(f"--batch-size must be at least {len(CLASSES)} so every batch holds every class")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    pixels, patterns = render_dataset(args.images, args.seed, args.threads)
    # A different seed stream from training data: this set only feeds the log lines. 6 per class, so that
    # text->image P@5 can reach 1.
    held_out, _ = render_dataset(len(CLASSES) * 6, args.seed + 10_000, 1)
    print(f"rendered {len(pixels)} training images in {time.perf_counter() - started:.1f} s", flush=True)

    model = open_clip.CLIP(**{**MODEL_CFG, "init_logit_scale": math.log(1 / 0.07)})
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    tokens = CaptionTokens(open_clip.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"]))
    loss_fn = open_clip.loss.ClipLoss()
    optimizer = build_optimizer(model, args.lr, args.weight_decay)
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(args.seed)
    caption_rng = random.Random(args.seed)

    train_started = time.perf_counter()
    running, logged = 0.0, 0
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        idx = sample_batch(len(pixels), args.batch_size, gen)
        images = pixels[idx].float() / 255.0
        flip = torch.rand(len(idx), generator=gen) < 0.5
        images[flip] = images[flip].flip(-1)
        images = (images - mean) / std
        # Captions are re-drawn every step, so the text tower sees every template and synonym for each class.
        texts = tokens(
            [
                synthetic.caption(CLASSES[i % len(CLASSES)][1], CLASSES[i % len(CLASSES)][0], patterns[i], caption_rng)
                for i in idx.tolist()
            ]
        )
        image_features, text_features, logit_scale = model(images, texts)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running += loss.item()
        logged += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            zero_shot, p_at_5 = quick_eval(model, tokens, held_out, mean, std)
            elapsed = time.perf_counter() - train_started
            print(
                f"step {step + 1}/{args.steps} loss {running / logged:.3f} "
                f"scale {model.logit_scale.exp().item():.1f} held-out zero-shot {zero_shot:.3f} "
                f"t2i P@5 {p_at_5:.3f} | {elapsed / (step + 1):.3f} s/step, {elapsed:.0f} s",
                flush=True,
            )
            running, logged = 0.0, 0

    save_model(model, args.out)
    check_saved(args.out, model, held_out)
    size_mb = (args.out / "open_clip_model.safetensors").stat().st_size / 1e6
    print(
        f"saved {args.out} ({size_mb:.1f} MB); training {time.perf_counter() - train_started:.0f} s, "
        f"total {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
