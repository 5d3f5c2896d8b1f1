"""Model loading: IMAGESEARCH_MODEL specs, devices and precisions, and open_clip model creation (pretrained tag,
checkpoint file, local directory, bundled model, or random weights), with a fast, explained failure offline."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from imagesearch.errors import ModelLoadError
from imagesearch.model.text_tower import TextWeights, fp16_weight_kernels_available

# Models that ship inside the package, addressable by a short name in IMAGESEARCH_MODEL.
BUNDLED_MODELS_DIR = Path(__file__).parent.parent / "models"
LOCAL_DIR_PREFIX = "local-dir:"
# "ARCH:random" builds the architecture with random weights: same compute as the real model, meaningless
# rankings. For benchmarks only. The weights come from a fixed seed, so every process builds the same model: a
# restarted server's stored vectors still match its encoder, and the runtime's converted graph (cached under a
# digest of the weights) is found again.
RANDOM_WEIGHTS_TAG = "random"
RANDOM_WEIGHTS_SEED = 0

SpecKind = Literal["local-dir", "pretrained", "checkpoint", "random"]


@dataclass(frozen=True)
class ModelSpec:
    """A parsed IMAGESEARCH_MODEL value."""

    raw: str
    kind: SpecKind
    arch: str = ""
    pretrained: str = ""
    path: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        """Parse "local-dir:DIR", a bundled model name, "ARCH:/path/weights.pt", "ARCH:TAG" or "ARCH:random"."""
        spec = spec.strip()
        bundled = BUNDLED_MODELS_DIR / spec
        if spec and "/" not in spec and ":" not in spec and (bundled / "open_clip_config.json").is_file():
            return cls(raw=spec, kind="local-dir", path=bundled)
        if spec.startswith(LOCAL_DIR_PREFIX):
            return cls(raw=spec, kind="local-dir", path=Path(spec[len(LOCAL_DIR_PREFIX) :]).expanduser())
        arch, sep, tag = spec.partition(":")
        if not sep or not arch or not tag:
            raise ModelLoadError(
                f"model spec {spec!r} is not understood: use ARCH:PRETRAINED_TAG (e.g. ViT-B-32:laion2b_s34b_b79k), "
                f"ARCH:/path/to/weights.pt, local-dir:/path/to/dir, or a bundled model ({', '.join(bundled_models())})"
            )
        if tag == RANDOM_WEIGHTS_TAG:
            return cls(raw=spec, kind="random", arch=arch)
        if "/" in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors")):
            return cls(raw=spec, kind="checkpoint", arch=arch, path=Path(tag).expanduser())
        return cls(raw=spec, kind="pretrained", arch=arch, pretrained=tag)


def bundled_models() -> list[str]:
    if not BUNDLED_MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_MODELS_DIR.iterdir() if (p / "open_clip_config.json").is_file())


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was requested but CUDA is not available on this machine")
    return device


def create_model(spec: ModelSpec, device: str) -> tuple[Any, Any, Any]:
    import open_clip  # imported late: importing it is slow and the hub offline switch must come first

    precision = precision_for(device)
    if spec.kind == "local-dir":
        assert spec.path is not None
        if not (spec.path / "open_clip_config.json").is_file():
            raise ModelLoadError(
                f"{spec.raw}: {spec.path} has no open_clip_config.json; a local-dir model needs "
                "open_clip_config.json and open_clip_model.safetensors (or open_clip_pytorch_model.bin)"
            )
        name = LOCAL_DIR_PREFIX + str(spec.path)
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device, precision=precision)
        tokenizer = open_clip.get_tokenizer(name)
    else:
        if spec.kind == "checkpoint":
            assert spec.path is not None
            if not spec.path.is_file():
                raise ModelLoadError(f"{spec.raw}: checkpoint file {spec.path} does not exist")
        pretrained = None if spec.kind == "random" else str(spec.path or spec.pretrained)
        # OpenAI's weights were trained with QuickGELU; the plain config loads them silently but computes wrong.
        quick_gelu = spec.pretrained == "openai" and not spec.arch.endswith("-quickgelu")
        # fork_rng: the seed is this model's own; the caller's random state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec.arch, pretrained=pretrained, device=device, precision=precision, force_quick_gelu=quick_gelu
            )
        tokenizer = open_clip.get_tokenizer(spec.arch)
    model.eval()
    return model, preprocess, tokenizer


def resolve_text_weights(requested: Literal["auto", "fp16", "fp32"], device: str) -> TextWeights:
    if device != "cpu":
        if requested == "fp32":
            raise ModelLoadError(f"text weights fp32 is a CPU option; on {device} the whole model runs in fp16")
        return "fp16"  # on a GPU the whole model is already half precision
    if requested == "auto":
        return "fp16" if fp16_weight_kernels_available() else "fp32"
    if requested == "fp16" and not fp16_weight_kernels_available():
        raise ModelLoadError(
            "text weights fp16 needs fbgemm's fp16 kernels, which this CPU build of torch lacks (they are x86 only); "
            "use auto or fp32"
        )
    return requested


def precision_for(device: str) -> Literal["fp16", "fp32"]:
    """Half precision on GPUs (twice the speed, same rankings); fp32 on CPU, where fp16 kernels are slow."""
    return "fp16" if device.startswith("cuda") else "fp32"


def enable_hub_offline_mode() -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; set both the variable (for a later import) and the
    # already-imported constant, so a missing download fails at once instead of after ~45 s of DNS retries.
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def load_failure_message(spec: ModelSpec, exc: Exception) -> str:
    how = (
        "Provide the weights in one of these ways: run once with internet access so open_clip caches them "
        "(under ~/.cache/huggingface); or set IMAGESEARCH_MODEL=ARCH:/path/to/weights.pt for a checkpoint file; "
        "or IMAGESEARCH_MODEL=local-dir:/path/to/dir for a directory holding open_clip_config.json and "
        "open_clip_model.safetensors. To try the service without any download, use the bundled test model: "
        "IMAGESEARCH_MODEL=synthetic-clip (it only knows synthetic catalogue images)."
    )
    return f"could not load model {spec.raw!r}: {type(exc).__name__}: {exc}. {how}"


Runtime = Literal["torch", "openvino"]


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_runtime(requested: Literal["auto", "torch", "openvino"], device: str) -> Runtime:
    """The towers' runtime. auto = OpenVINO on CPU where it is installed, torch on CUDA; an explicit choice that
    cannot be honoured is an error, never a silent fallback."""
    if requested == "torch":
        return "torch"
    if requested == "openvino":
        if device != "cpu":
            raise ModelLoadError(f"runtime openvino runs on the CPU; the device is {device}: use runtime auto or torch")
        if not openvino_installed():
            raise ModelLoadError("runtime openvino needs the openvino package (pip install openvino), or runtime torch")
        return "openvino"
    return "openvino" if device == "cpu" and openvino_installed() else "torch"
