"""A lean forward pass for CLIP's text tower: unpadded, and with half-size weights on CPU.

Why: a search query is a handful of tokens, so the text forward is a chain of matrix-vector-like products whose
cost is reading the weights (~150 MB in fp32 for ViT-B-32's text tower); measured on a 2-core x86 machine,
fp32 products of that shape ran at ~8 GB/s, 24 of the 28 ms of a forward. Two things cut it:

- Unpadded: CLIP's text tower is causal and pools the end-of-text token, so running the real token length
  instead of the 77 padded positions gives the same output (checked in the tests).
- fp16 weights: fbgemm's fp16 kernels keep the weights in half precision and compute in fp32, halving the bytes
  read (2.4x faster on the products above). fp16 is the precision CLIP runs at on every GPU; the embeddings
  agree with fp32 at cosine > 0.9999 (tests, `benchmarks/quantization.py`). Never int8 for this tower: int8
  is known to break it on pretrained weights, which cannot be downloaded here to check.

open_clip's own block calls nn.MultiheadAttention, whose projection is a bare parameter that no packed kernel
can take; so the attention here is rebuilt from the same weights with explicit projections and
`scaled_dot_product_attention`. Only open_clip's standard `ResidualAttentionBlock` layout is rebuilt; any other
model runs open_clip's own padded text path (ClipEncoder.encode_texts_padded).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional

TextWeights = Literal["fp32", "fp16"]


def fp16_weight_kernels_available() -> bool:
    """Whether this CPU build has fbgemm, whose fp16-weight kernels the `fp16` option needs (x86 only)."""
    engines = torch.backends.quantized.supported_engines
    return "fbgemm" in engines or "x86" in engines


class LeanTextTower(nn.Module):
    """CLIP.encode_text(tokens, normalize=True), unpadded, over weights taken from an open_clip CLIP model."""

    def __init__(self, model: Any, weights: TextWeights) -> None:
        super().__init__()
        self.token_embedding = model.token_embedding
        self.positional_embedding: nn.Parameter = model.positional_embedding  # shared with the model, not copied
        blocks = nn.ModuleList(_LeanBlock(block) for block in model.transformer.resblocks)
        # On a GPU open_clip has already halved the weights (and `weights` is fp16 too); fp32 weights on CPU
        # are converted to fbgemm's packed fp16 form here.
        self.dtype = model.transformer.get_cast_dtype()
        self.blocks = _fp16_weights(blocks) if weights == "fp16" and self.dtype == torch.float32 else blocks
        self.ln_final = model.ln_final
        projection = model.text_projection
        self.projection: nn.Module = (
            nn.Identity()
            if projection is None
            else projection
            if isinstance(projection, nn.Linear)
            else _ProjectionMatrix(projection)
        )
        self.pool_type = model.text_pool_type

    @classmethod
    def supports(cls, model: Any) -> bool:
        """True for open_clip's CLIP with a causal text tower of standard blocks, pooled at end-of-text."""
        from open_clip.transformer import ResidualAttentionBlock

        if type(model).__name__ != "CLIP" or getattr(model, "attn_mask", None) is None:
            return False
        if getattr(model, "text_pool_type", None) != "argmax":
            return False
        return all(
            type(block) is ResidualAttentionBlock
            and isinstance(block.attn, nn.MultiheadAttention)
            and block.attn._qkv_same_embed_dim
            and block.attn.in_proj_bias is not None
            and block.attn.bias_k is None
            and not block.attn.add_zero_attn
            and not hasattr(block, "ln_1_kv")
            for block in model.transformer.resblocks
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        length = int((tokens != 0).sum(dim=1).max())  # 0 is the pad token; every row has start and end tokens
        tokens = tokens[:, :length]
        x = self.token_embedding(tokens).to(self.dtype) + self.positional_embedding[:length].to(self.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x)
        pooled = text_global_pool(x, tokens, self.pool_type)
        return functional.normalize(self.projection(pooled), dim=-1)


class _LeanBlock(nn.Module):
    """open_clip's ResidualAttentionBlock with a causal mask, with explicit q/k/v and output projections."""

    def __init__(self, block: Any) -> None:
        super().__init__()
        attn: nn.MultiheadAttention = block.attn
        self.heads = attn.num_heads
        self.ln_1, self.ls_1, self.ln_2, self.ls_2 = block.ln_1, block.ls_1, block.ln_2, block.ls_2
        width = attn.embed_dim
        qkv = nn.Linear(width, 3 * width)
        qkv.weight, qkv.bias = attn.in_proj_weight, attn.in_proj_bias
        out = nn.Linear(width, width)
        out.weight, out.bias = attn.out_proj.weight, attn.out_proj.bias
        self.qkv, self.out, self.mlp = qkv, out, block.mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        # is_causal is open_clip's causal mask, sliced to this length.
        attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.ls_1(self.out(attended.transpose(1, 2).reshape(batch, length, width)))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class _ProjectionMatrix(nn.Module):
    def __init__(self, matrix: nn.Parameter) -> None:
        super().__init__()
        self.matrix = matrix  # shared with the model, not copied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix


def _fp16_weights(module: nn.ModuleList) -> nn.ModuleList:
    """A copy of `module` with every nn.Linear's weights stored in fp16 (fbgemm; computes in fp32)."""
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which we do not depend on; the eager API
        # still works on the torch versions we support.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        converted: nn.ModuleList = torch.ao.quantization.quantize_dynamic(module, {nn.Linear}, dtype=torch.float16)
    return converted
