"""Export of CLIP's towers to ONNX, the first step of the OpenVINO conversion (openvino_runtime.py): the modules
that are exported (the image tower with its normalisation, the unpadded text tower) and the export itself."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from imagesearch.errors import ModelLoadError
from imagesearch.model.runtime_cache import ONNX_OPSET
from imagesearch.model.text_tower import LeanTextTower


def check_exportable(module: nn.Module) -> None:
    """Raise ModelLoadError unless `module` is an fp32 CPU module, not torch-quantised."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.device.type != "cpu" or (tensor.is_floating_point() and tensor.dtype != torch.float32):
            raise ModelLoadError(
                f"the OpenVINO runtime takes the fp32 CPU model; {name} is {tensor.dtype} on {tensor.device}"
            )
    if any(type(sub).__module__.startswith("torch.ao.nn.quantized") for sub in module.modules()):
        raise ModelLoadError(
            "the tower is torch-quantised (int8); the OpenVINO runtime exports the fp32 tower: turn off torch "
            "quantisation of the image tower to use it"
        )


class NormalisedImageTower(nn.Module):
    """model.visual followed by CLIP's L2 normalisation: exactly encode_image(x, normalize=True)."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.visual(pixels), dim=-1)


class UnpaddedTextTower(nn.Module):
    """LeanTextTower's forward on tokens already cut to the batch's real length, so the length is an input
    dimension of the graph (LeanTextTower measures it from the values, which a trace would freeze)."""

    def __init__(self, lean: LeanTextTower) -> None:
        super().__init__()
        self.lean = lean

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        lean = self.lean
        x = lean.token_embedding(tokens) + lean.positional_embedding[: tokens.shape[1]]
        for block in lean.blocks:
            x = block(x)
        pooled = text_global_pool(lean.ln_final(x), tokens, lean.pool_type)
        return nn.functional.normalize(lean.projection(pooled), dim=-1)


def export_onnx(module: nn.Module, example: torch.Tensor, dynamic_axes: dict[str, dict[int, str]], path: Path) -> None:
    # Batch 2 in the examples: with 1, the tracer may fold the batch dimension into constants.
    was_training = module.training
    # Without gradients, nn.MultiheadAttention takes its fused fast path, an op ONNX has no equivalent for; the
    # switch is global, so it is restored at once.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    module.eval()
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the dynamo one; it is the route that converted
            # open_clip's towers cleanly here. TracerWarnings come from shape asserts in torch's attention, which
            # hold for every batch size.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The text tower's end-of-text pooling indexes with argmax positions, which are never negative.
            warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=["inputs"],
                output_names=["embedding"],
                dynamic_axes=dynamic_axes,
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    except Exception as exc:
        raise ModelLoadError(f"could not export the tower for OpenVINO: {type(exc).__name__}: {exc}") from exc
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        module.train(was_training)
