"""MetalEmbedding: an ``nn.Embedding`` whose table is stored MLX-quantized (MLX ``QuantizedEmbedding``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .linear import register_packed_buffers
from .ops import affine_dequantize, affine_qmm_t, affine_quantize, fp_dequantize, fp_qmm_t, fp_quantize


class MetalEmbedding(nn.Module):
    """A lookup table of low-bit rows: ``forward(ids) = dequantize(weight[ids], scales[ids], qbiases[ids])``.

    Each row (one token) is quantized along ``embedding_dim``, so a lookup gathers whole packed rows and
    dequantizes only those: exactly the float row ``scales * q + qbiases``, at the cost of the gather.
    The state_dict is MLX's ``QuantizedEmbedding`` with ``biases`` spelled ``qbiases`` (as in transformers'
    Metal layout): ``weight`` uint32 ``(num_embeddings, embedding_dim*bits/32)``, ``scales`` and ``qbiases``
    ``(num_embeddings, embedding_dim/group_size)``. These are the shapes of a :class:`metalq.MetalLinear`
    with ``in_features=embedding_dim``, so :meth:`as_linear` serves a tied output head from the same table.
    In the floating-point modes ``scales`` is uint8 and there is no ``qbiases``.

    Args:
        num_embeddings, embedding_dim: as ``nn.Embedding``; ``embedding_dim % group_size == 0``.
        padding_idx: kept for reference (quantized rows are frozen, so it has no effect on training).
        embed_scale: a factor every looked-up row is multiplied by (in the output dtype), as transformers' scaled
            word embeddings do (Gemma's ``sqrt(hidden_size)``); not applied by :meth:`as_linear`.
        bits, group_size, mode: the quantization format (see :class:`metalq.MetalConfig`).
        dtype: float dtype of ``scales``/``qbiases`` and of the output (default: torch's default dtype).
        device: where to allocate; ``"meta"`` builds a shell for ``load_state_dict(..., assign=True)``.

    Example:
        >>> emb = MetalEmbedding.from_embedding(nn.Embedding(32000, 4096), bits=4, group_size=64)
        >>> h = emb(torch.tensor([[1, 2, 3]]))          # (1, 3, 4096)
        >>> logits = emb.as_linear(h)                    # (1, 3, 32000): a tied output head
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int] = None,
        bits: Optional[int] = None,
        group_size: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device=None,
        mode: str = "affine",
        embed_scale: Optional[float] = None,
    ):
        super().__init__()
        register_packed_buffers(self, "MetalEmbedding", num_embeddings, ("embedding_dim", embedding_dim), bits,
                                group_size, dtype, device, mode)
        self.float_dtype = dtype or torch.get_default_dtype()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.embed_scale = embed_scale

    @staticmethod
    def scale_of(embedding: nn.Module) -> Optional[float]:
        """The factor a transformers scaled word embedding multiplies its rows by (its ``embed_scale``), or None."""
        scale = getattr(embedding, "scalar_embed_scale", None)  # a float, known on the meta device too
        if scale is None:
            tensor = getattr(embedding, "embed_scale", None)
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                scale = tensor.item()
        return None if scale is None else float(scale)

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, bits: Optional[int] = None, group_size: Optional[int] = None,
        mode: str = "affine",
    ) -> "MetalEmbedding":
        """Quantize ``embedding.weight`` row by row (bit-identical to ``mx.quantize``); affine scales keep its dtype."""
        if embedding.max_norm is not None:
            raise ValueError("MetalEmbedding.from_embedding: max_norm renormalises rows in place; not supported")
        weight = embedding.weight.detach()
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            padding_idx=embedding.padding_idx,
            bits=bits,
            group_size=group_size,
            dtype=weight.dtype,
            device="meta",  # the buffers are replaced just below
            mode=mode,
            embed_scale=cls.scale_of(embedding),
        )
        if mode == "affine":
            layer.weight, layer.scales, layer.qbiases = affine_quantize(weight, layer.group_size, layer.bits)
        else:
            layer.weight, layer.scales = fp_quantize(weight, mode)
        return layer

    def _dequantize_rows(self, rows: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        """The float rows of packed ``rows`` (table rows ``ids``, or all rows when ``ids`` is None)."""
        scales = self.scales if ids is None else self.scales.index_select(0, ids)
        if self.mode != "affine":
            return fp_dequantize(rows, scales, self.mode, dtype=self.float_dtype)
        biases = self.qbiases if ids is None else self.qbiases.index_select(0, ids)
        return affine_dequantize(rows, scales, biases, self.group_size, self.bits)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        # index_select on the int32 view: uint32 has few kernels on CPU and MPS
        rows = self.weight.view(torch.int32).index_select(0, flat).view(torch.uint32)
        out = self._dequantize_rows(rows, flat).reshape(*ids.shape, self.embedding_dim)
        return out if self.embed_scale is None else out * torch.tensor(self.embed_scale, dtype=out.dtype)

    def as_linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ dequantize(table).T``: scores against every row, for an output head tied to this table.

        Args:
            x: ``(..., embedding_dim)`` float32, float16 or bfloat16.

        Returns:
            ``(..., num_embeddings)`` in ``x.dtype`` (MLX ``QuantizedEmbedding.as_linear``).
        """
        if self.mode != "affine":
            return fp_qmm_t(x, self.weight, self.scales, self.mode)
        return affine_qmm_t(
            x, self.weight, self.scales.to(x.dtype), self.qbiases.to(x.dtype), self.group_size, self.bits
        )

    def dequantize(self) -> nn.Embedding:
        """A float ``nn.Embedding`` holding the dequantized table, on the device of ``scales``, in their dtype
        (affine) or in ``float_dtype`` (the floating-point modes)."""
        if self.embed_scale is not None:
            raise ValueError(f"MetalEmbedding.dequantize: this table scales its rows by embed_scale={self.embed_scale:g} "
                             f"(a transformers scaled word embedding), which a plain nn.Embedding cannot; load the "
                             f"float model again instead")
        weight = self._dequantize_rows(self.weight, None)
        embedding = nn.Embedding(
            self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, dtype=weight.dtype, device="meta"
        )
        embedding.weight = nn.Parameter(weight)
        return embedding

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        pad += "" if self.embed_scale is None else f", embed_scale={self.embed_scale:g}"
        return (
            f"{self.num_embeddings}, {self.embedding_dim}{pad}, bits={self.bits}, group_size={self.group_size}"
            + ("" if self.mode == "affine" else f", mode={self.mode}")
        )


class MetalTiedHead(nn.Module):
    """An output head tied to a :class:`MetalEmbedding`: ``forward(x) = embedding.as_linear(x) (+ bias)``.

    It owns no copy of the table. The embedding is held by reference, not registered as a submodule, so
    the state_dict has no duplicate of the table (as in an mlx-lm checkpoint with tied embeddings, which
    has no ``lm_head`` tensors) and ``.to()`` moves the table once, through the embedding's own parent.

    Args:
        embedding: the input embedding whose rows score the outputs.
        bias: optional float bias ``(num_embeddings,)``, kept as a parameter.
    """

    def __init__(self, embedding: MetalEmbedding, bias: Optional[torch.Tensor] = None):
        super().__init__()
        object.__setattr__(self, "embedding", embedding)  # not a submodule (see the class docstring)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.embedding.as_linear(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"tied to MetalEmbedding({self.embedding.extra_repr()}), bias={self.bias is not None}"
