"""Mixture-of-experts layers: stacked quantized expert matrices and transformers' fused experts on top of them.

- :class:`MetalSwitchLinear` is MLX's ``QuantizedSwitchLinear``: one packed matrix per expert, applied to
  each token with the matrix its expert index picks (``affine_gather_qmm``).
- :class:`MetalExperts` replaces a transformers fused experts module (3-D ``gate_up_proj`` or ``up_proj``
  and ``down_proj`` parameters, one slice per expert) by MetalSwitchLinear projections of the same names,
  keeping the module's own gating, activation and routing-weight semantics.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import DEFAULT_BITS, DEFAULT_GROUP_SIZE
from .linear import register_packed_buffers
from .ops import affine_dequantize, affine_gather_qmm, affine_quantize

# mlx-lm's SwitchGLU sorts the token-expert pairs by expert from this many pairs on, so each expert's
# matrix is read once for a run of rows instead of once per row
SORT_MIN_PAIRS = 64


def require_affine(owner: str, mode: str) -> None:
    """Experts run MLX's gather_qmm in affine mode only: the floating-point modes raise ``ValueError``."""
    if mode != "affine":
        raise ValueError(f"{owner}: mode {mode!r} is not supported for experts (affine only); keep them out of a "
                         f"floating-point-mode config")


class MetalSwitchLinear(nn.Module):
    """``num_experts`` quantized Linears in one module: ``forward(x, e)[..., i, :] = x @ dequantize(weight[e_i]).T``.

    The state_dict is MLX's ``QuantizedSwitchLinear`` with ``biases`` spelled ``qbiases`` (as in
    :class:`metalq.MetalLinear`): ``weight`` uint32 ``(num_experts, out_features, in_features*bits/32)``,
    ``scales`` and ``qbiases`` ``(num_experts, out_features, in_features/group_size)``, optional float ``bias``
    ``(num_experts, out_features)``. The quantized tensors are frozen buffers; gradients reach the input.

    Args:
        num_experts, in_features, out_features: the stack's shape; ``in_features % group_size == 0``.
        bias: whether to hold a float bias per expert.
        bits, group_size: the quantization format (see :class:`metalq.MetalConfig`).
        dtype: float dtype of ``scales``, ``qbiases`` and ``bias`` (default: torch's default dtype).
        device: where to allocate; ``"meta"`` builds a shell for ``load_state_dict(..., assign=True)``.

    Example:
        >>> experts = MetalSwitchLinear.from_float(torch.randn(8, 256, 512), bits=4, group_size=64)
        >>> y = experts(torch.randn(5, 1, 1, 512), torch.randint(0, 8, (5, 2)))   # (5, 2, 1, 256)
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        bias: bool = False,
        bits: int = DEFAULT_BITS,
        group_size: int = DEFAULT_GROUP_SIZE,
        dtype: Optional[torch.dtype] = None,
        device=None,
    ):
        super().__init__()
        register_packed_buffers(self, "MetalSwitchLinear", (num_experts, out_features), ("in_features", in_features),
                                bits, group_size, dtype, device)
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        bits: int = DEFAULT_BITS,
        group_size: int = DEFAULT_GROUP_SIZE,
    ) -> "MetalSwitchLinear":
        """Quantize stacked expert weights ``(num_experts, out_features, in_features)`` (each row bit-identical to
        ``mx.quantize``); ``bias`` is ``(num_experts, out_features)`` or None. Scales keep the weight's dtype."""
        weight = weight.detach()
        if weight.dim() != 3:
            raise ValueError(
                f"MetalSwitchLinear.from_float: weight must be (num_experts, out_features, in_features), "
                f"got shape {tuple(weight.shape)}"
            )
        num_experts, out_features, in_features = weight.shape
        if bias is not None and tuple(bias.shape) != (num_experts, out_features):
            raise ValueError(f"MetalSwitchLinear.from_float: bias must have shape {(num_experts, out_features)}, "
                             f"got {tuple(bias.shape)}")
        layer = cls(num_experts, in_features, out_features, bias=bias is not None, bits=bits, group_size=group_size,
                    dtype=weight.dtype, device="meta")  # the buffers are replaced just below
        layer.weight, layer.scales, layer.qbiases = affine_quantize(weight, group_size, bits)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return layer

    def forward(self, x: torch.Tensor, expert_indices: torch.Tensor, sorted_indices: bool = False) -> torch.Tensor:
        """``x @ dequantize(weight[expert_indices]).T`` (+ ``bias[expert_indices]``), MLX ``QuantizedSwitchLinear``.

        Args:
            x: ``(..., M, in_features)``; its batch dimensions broadcast against ``expert_indices``.
            expert_indices: integer expert ids, any shape that broadcasts with ``x.shape[:-2]``.
            sorted_indices: promise that the (flattened) ids are sorted, as after grouping rows by expert.

        Returns:
            ``(*broadcast(x.shape[:-2], expert_indices.shape), M, out_features)`` in ``x.dtype``.
        """
        y = affine_gather_qmm(
            x, self.weight, self.scales.to(x.dtype), self.qbiases.to(x.dtype), rhs_indices=expert_indices,
            transpose=True, group_size=self.group_size, bits=self.bits, sorted_indices=sorted_indices,
        )
        return y if self.bias is None else y + self.bias[expert_indices].unsqueeze(-2).to(y.dtype)

    def dequantize(self) -> torch.Tensor:
        """The float stacked weights ``scales * q + qbiases``, ``(num_experts, out_features, in_features)``."""
        return affine_dequantize(self.weight, self.scales, self.qbiases, self.group_size, self.bits)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.bits}, group_size={self.group_size}"
        )


# ---- transformers' fused experts ------------------------------------------------------------------------

# transformers' fused experts hold their expert matrices as 3-D parameters of these names (the first
# projection is gate_up_proj for gated experts, up_proj otherwise), with optional "<name>_bias" (E, out)
FIRST_PROJECTIONS = ("gate_up_proj", "up_proj")
LAST_PROJECTION = "down_proj"


def expert_projections(module: nn.Module) -> Optional[dict[str, tuple[int, int, int]]]:
    """``{name: (num_experts, out_features, in_features)}`` of a fused experts module's projections (float or
    already :class:`MetalExperts`), or None when ``module`` is no such module.

    A fused experts module has a 3-D ``down_proj`` and a 3-D ``gate_up_proj`` or ``up_proj`` with one slice per
    expert, stored ``(E, out, in)``, or ``(E, in, out)`` when its ``is_transposed`` attribute is set."""
    if isinstance(module, MetalExperts):
        return {
            name: (layer.num_experts, layer.out_features, layer.in_features) for name, layer in module.projections()
        }
    first = [name for name in FIRST_PROJECTIONS if _stacked(module, name)]
    if len(first) != 1 or not _stacked(module, LAST_PROJECTION):
        return None
    shapes = {}
    for name in (first[0], LAST_PROJECTION):
        experts, rows, columns = module._parameters[name].shape
        shapes[name] = (experts, columns, rows) if getattr(module, "is_transposed", False) else (experts, rows, columns)
    return shapes


def _stacked(module: nn.Module, name: str) -> bool:
    param = module._parameters.get(name)
    return param is not None and param.dim() == 3


class MetalExperts(nn.Module):
    """A transformers fused experts module whose expert matrices are :class:`MetalSwitchLinear` projections.

    Built from the float module (:meth:`from_experts`) it keeps that module's configuration attributes,
    submodules (``act_fn``, an optional ``post_expert_norm``) and gating rule (its class's ``_apply_gate``),
    and replaces each 3-D projection parameter ``<name>`` (with its ``<name>_bias``) by a MetalSwitchLinear
    called ``<name>``: the state_dict holds ``<name>.weight``, ``<name>.scales``, ``<name>.qbiases`` (and
    ``<name>.bias``). ``forward(hidden_states, top_k_index, top_k_weights)`` has the float module's signature
    and result: each token's top-k expert outputs weighted by ``top_k_weights`` and summed. With many
    token-expert pairs (``SORT_MIN_PAIRS``) the pairs are grouped by expert first, as mlx-lm's SwitchGLU does.
    """

    def __init__(self, experts: nn.Module, projections: dict[str, MetalSwitchLinear]):
        super().__init__()
        shapes = expert_projections(experts)
        if shapes is None:
            raise TypeError(f"MetalExperts: {type(experts).__name__} has no 3-D gate_up_proj/up_proj and down_proj")
        if projections.keys() != shapes.keys():
            raise ValueError(f"MetalExperts: projections {sorted(projections)} do not match {sorted(shapes)}")
        owned = set(shapes) | {f"{name}_bias" for name in shapes}
        for key, value in vars(experts).items():  # plain configuration (num_experts, has_gate, config, ...)
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        for name, child in experts._modules.items():
            if name not in shapes:  # a MetalExperts' own projections are replaced below
                self.add_module(name, child)
        for name, param in experts._parameters.items():
            if name not in owned:
                self.register_parameter(name, param)
        for name, buffer in experts._buffers.items():
            self.register_buffer(name, buffer, persistent=name not in experts._non_persistent_buffers_set)
        self.float_class = experts.float_class if isinstance(experts, MetalExperts) else type(experts)
        self.first_projection = next(name for name in FIRST_PROJECTIONS if name in shapes)
        self.gated = getattr(experts, "has_gate", self.first_projection == "gate_up_proj")
        for name, layer in projections.items():
            if (layer.num_experts, layer.out_features, layer.in_features) != shapes[name]:
                raise ValueError(
                    f"MetalExperts: {name} has shape {(layer.num_experts, layer.out_features, layer.in_features)}, "
                    f"expected {shapes[name]}"
                )
            self.add_module(name, layer)

    @classmethod
    def from_experts(
        cls, experts: nn.Module, bits: int = DEFAULT_BITS, group_size: int = DEFAULT_GROUP_SIZE, mode: str = "affine"
    ) -> "MetalExperts":
        """Quantize a float fused experts module's projections (stored ``(E, in, out)`` when it is transposed);
        experts are affine only."""
        require_affine("MetalExperts", mode)
        shapes = expert_projections(experts)
        if shapes is None:
            raise TypeError(f"MetalExperts: {type(experts).__name__} has no 3-D gate_up_proj/up_proj and down_proj")
        transposed = getattr(experts, "is_transposed", False)
        projections = {}
        for name in shapes:
            weight = experts._parameters[name].detach()
            projections[name] = MetalSwitchLinear.from_float(
                weight.transpose(-1, -2) if transposed else weight, getattr(experts, f"{name}_bias", None),
                bits=bits, group_size=group_size,
            )
        return cls(experts, projections)

    def projections(self) -> list[tuple[str, MetalSwitchLinear]]:
        """``(name, layer)`` of the expert projections, in order of application."""
        return [(name, self._modules[name]) for name in (self.first_projection, LAST_PROJECTION)]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        tokens, top_k = top_k_index.shape
        grouped = top_k_index.numel() >= SORT_MIN_PAIRS
        if grouped:
            order = top_k_index.reshape(-1).argsort(stable=True)
            indices = top_k_index.reshape(-1)[order]  # (pairs,), sorted
            x = hidden_states[order // top_k].unsqueeze(-2)  # (pairs, 1, hidden)
        else:
            indices = top_k_index  # (tokens, top_k), against x's (tokens, 1) batch
            x = hidden_states[:, None, None, :]
        first, last = (layer for _, layer in self.projections())
        h = first(x, indices, sorted_indices=grouped)
        h = self.float_class._apply_gate(self, h) if self.gated else self.act_fn(h)
        h = last(h, indices, sorted_indices=grouped).squeeze(-2)
        if getattr(self, "has_post_expert_norm", False):
            h = self.post_expert_norm(h)
        if grouped:
            h = torch.empty_like(h).index_copy_(0, order, h)
        h = h.reshape(tokens, top_k, -1) * top_k_weights.unsqueeze(-1)
        return h.sum(dim=1).to(hidden_states.dtype)

    def dequantize(self) -> nn.Module:
        """The float experts module (of the original class) holding the dequantized expert matrices."""
        with torch.device("meta"):
            experts = self.float_class(self.config)
        transposed = getattr(self, "is_transposed", False)
        for name, layer in self.projections():
            weight = layer.dequantize()
            experts._parameters[name] = nn.Parameter(weight.transpose(-1, -2).contiguous() if transposed else weight)
            if layer.bias is not None:
                experts._parameters[f"{name}_bias"] = nn.Parameter(layer.bias.detach().clone())
        for name, child in self._modules.items():
            if not isinstance(child, MetalSwitchLinear):
                experts._modules[name] = child
        for name, param in self._parameters.items():
            experts._parameters[name] = param
        for name, buffer in self._buffers.items():
            experts._buffers[name] = buffer
        return experts

    def extra_repr(self) -> str:
        return f"{self.float_class.__name__}, gated={self.gated}"
