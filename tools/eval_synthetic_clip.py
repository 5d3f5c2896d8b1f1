"""Evaluate the synthetic-catalogue CLIP on fresh renders, loading it exactly as a user would.

    .venv/bin/python tools/eval_synthetic_clip.py [--model-dir src/imagesearch/models/synthetic-clip]

The gallery is a synthetic catalogue (`make_catalogue`) with a seed that training never used; every image goes
through JPEG at 128 px and back, then the model's own open_clip preprocess, as in the service. A hit is a result
whose colour and kind both match. Exits 1 when any metric is below the bar.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from imagesearch.synthetic import renderer as synthetic  # noqa: E402

DEFAULT_MODEL_DIR = REPO / "src" / "imagesearch" / "models" / "synthetic-clip"
EVAL_SEED = 20_240_601  # never used by training, which seeds its renders from small multiples of 1000
PROMPT = "a photo of a {colour} {kind}"
CLASSES: list[tuple[str, str]] = [(colour, kind) for colour in synthetic.COLOURS for kind in synthetic.KINDS]

Tokenizer = Callable[[list[str]], torch.Tensor]
Preprocess = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class Metrics:
    n_images: int
    text_to_image_p_at_5: float
    text_to_image_top1: float
    image_to_image_p_at_5: float
    zero_shot_accuracy: float


# The bar a trained model must clear; tests use the same metrics on a smaller gallery with a lower bar.
BAR = {"text_to_image_p_at_5": 0.85, "zero_shot_accuracy": 0.85, "image_to_image_p_at_5": 0.75}


def load_model(model_dir: Path) -> tuple[open_clip.CLIP, Preprocess, Tokenizer]:
    """The model, its inference preprocess and its tokenizer, through open_clip's public `local-dir:` loader."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    model.eval()
    return model, preprocess, tokenizer


def gallery(n: int, seed: int) -> tuple[list[Image.Image], torch.Tensor]:
    """`n` catalogue images decoded from their 128 px JPEG bytes, and each one's class index into CLASSES."""
    items = synthetic.make_catalogue(n, seed)
    images = [Image.open(io.BytesIO(item.jpeg(128))).convert("RGB") for item in items]
    labels = torch.tensor([CLASSES.index((item.colour, item.kind)) for item in items])
    return images, labels


def _precision_at_5(scores: torch.Tensor, query_labels: torch.Tensor, gallery_labels: torch.Tensor) -> float:
    top5 = scores.topk(5, dim=1).indices
    return gallery_labels[top5].eq(query_labels[:, None]).float().mean().item()


def evaluate(
    model: open_clip.CLIP,
    preprocess: Preprocess,
    tokenizer: Tokenizer,
    images: Sequence[Image.Image],
    labels: torch.Tensor,
) -> Metrics:
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        prompts = [PROMPT.format(colour=colour, kind=kind) for colour, kind in CLASSES]
        text_features = model.encode_text(tokenizer(prompts), normalize=True)

    class_ids = torch.arange(len(CLASSES))
    text_to_image = text_features @ image_features.T
    image_to_image = image_features @ image_features.T
    image_to_image.fill_diagonal_(-torch.inf)  # a query must not find itself
    return Metrics(
        n_images=len(images),
        text_to_image_p_at_5=_precision_at_5(text_to_image, class_ids, labels),
        text_to_image_top1=labels[text_to_image.argmax(dim=1)].eq(class_ids).float().mean().item(),
        image_to_image_p_at_5=_precision_at_5(image_to_image, labels, labels),
        zero_shot_accuracy=(image_features @ text_features.T).argmax(dim=1).eq(labels).float().mean().item(),
    )


def failures(metrics: Metrics, bar: dict[str, float]) -> list[str]:
    return [
        f"{name} {getattr(metrics, name):.3f} < {minimum}"
        for name, minimum in bar.items()
        if getattr(metrics, name) < minimum
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="open_clip local-dir model")
    parser.add_argument("--images", type=int, default=480, help="gallery size, >= 400 (default 480: 6 per class)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help=f"gallery seed (default {EVAL_SEED})")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    model, preprocess, tokenizer = load_model(args.model_dir)
    load_s = time.perf_counter() - started
    weights = sorted(args.model_dir.glob("*.safetensors"))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: local-dir:{args.model_dir}")
    print(
        f"parameters: {n_params:,} ({n_params / 1e6:.2f}M); weights file: "
        + ", ".join(f"{w.name} {w.stat().st_size / 1e6:.1f} MB" for w in weights)
        + f"; load {load_s:.2f} s"
    )

    images, labels = gallery(args.images, args.seed)
    started = time.perf_counter()
    metrics = evaluate(model, preprocess, tokenizer, images, labels)
    print(
        f"gallery: {metrics.n_images} fresh catalogue renders (seed {args.seed}, 128 px JPEG), "
        f"{len(CLASSES)} colour x kind classes; encoded in {time.perf_counter() - started:.1f} s"
    )
    print(f"text->image P@5 (colour+kind), prompts '{PROMPT}': {metrics.text_to_image_p_at_5:.3f}")
    print(f"text->image top-1:                                  {metrics.text_to_image_top1:.3f}")
    print(f"image->image P@5 (same colour+kind, self excluded): {metrics.image_to_image_p_at_5:.3f}")
    print(f"zero-shot accuracy over {len(CLASSES)} prompts:            {metrics.zero_shot_accuracy:.3f}")

    failed = failures(metrics, BAR)
    if failed:
        print("BELOW THE BAR: " + "; ".join(failed))
        return 1
    print("PASS: " + ", ".join(f"{name} >= {minimum}" for name, minimum in BAR.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
