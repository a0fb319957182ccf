"""Better bits in the same file: quantizers that choose MLX affine codes, scales and biases more carefully than
rounding to nearest, and a per-layer choice of bits. The output is an ordinary metalq / MLX checkpoint.

Methods:
    ``"rtn"``: round to nearest, exactly ``mx.quantize`` (what :func:`metalq.quantize_` does).
    ``"clip"``: per-group clipping range search; data-free, or weighted by calibration activations when given.
    ``"awq"``: activation-aware input scales folded into the op before each layer where the architecture
    allows (norms, V, up_proj), then the activation-weighted clip search.
    ``"gptq"``: GPTQ error compensation with each layer's input Hessian from calibration activations.
    ``"dwq"``: GPTQ's codes, then every scale and bias trained to match the float model's outputs (distillation).

``bpw`` (bits per weight, scales and biases counted at 16 bits each) switches on mixed precision: each
layer's relative output error is measured for every candidate format and bits go where they lower it most.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import MetalConfig, axis_multiple
from ..embedding import MetalEmbedding, MetalTiedHead
from ..linear import MetalLinear
from ..ops import pack
from ..quantize import ConfigSpec, _config_resolver, _find, _is_linear
from .awq import apply_awq
from .clip import clip_search
from .codes import metal_linear_from_codes
from .data import Forward, calibration_batches, default_forward
from .dwq import EPOCHS, learn_scales_and_biases, teacher_targets
from .gptq import DAMPING, gptq_quantize
from .mixed import bits_per_weight, choose_formats

METHODS = ("rtn", "clip", "awq", "gptq", "dwq")
DATA_METHODS = ("awq", "gptq", "dwq")  # the methods that need calibration data (and full input Hessians)
HESSIAN_MEMORY = 1 << 30
# 2 bits is left out: a layer the per-layer estimate calls insensitive at 2 bits still costs the model dearly
DEFAULT_CANDIDATES = tuple((bits, group_size) for bits in (3, 4, 5, 6, 8) for group_size in (32, 64, 128))


def calibrate(
    model: nn.Module,
    config: ConfigSpec = MetalConfig(),
    calibration=None,
    *,
    method: str = "gptq",
    tokenizer=None,
    forward: Optional[Forward] = None,
    bpw: Optional[float] = None,
    candidates: Iterable[tuple[int, int]] = DEFAULT_CANDIDATES,
    embeddings: bool = False,
    batch_size: int = 8,
    max_length: int = 512,
    damping: float = DAMPING,
    epochs: int = EPOCHS,
    hessian_memory: int = HESSIAN_MEMORY,
) -> dict[str, MetalConfig]:
    """Quantize ``model`` in place like :func:`metalq.quantize_`, choosing codes with ``method``.

    Args:
        model: any module; its ``nn.Linear`` layers (and with ``embeddings`` its ``nn.Embedding`` tables,
            always data-free clip or RTN) become MetalLinear / MetalEmbedding.
        config: as for :func:`metalq.quantize_` (affine mode only); with ``bpw`` only its
            ``modules_to_not_convert`` and which layers it selects count.
        calibration: texts (with ``tokenizer``), token ids, input tensors, a dict of model inputs or an
            iterable of batches (a DataLoader); needed by ``"awq"``, ``"gptq"``, ``"dwq"`` and by ``bpw``,
            optional for ``"clip"``.
        method: one of :data:`METHODS` (see the module's doc).
        forward: ``(model, batch) -> output``; by default ``model(**batch)`` for dicts, ``model(batch)`` for
            tensors (``inputs_embeds`` for float tensors and a model with token embeddings).
        bpw: target bits per weight over the selected layers (mixed precision), from ``candidates``
            (``(bits, group_size)`` pairs).
        damping: GPTQ's damping, a fraction of the mean Hessian diagonal.
        epochs: passes over the calibration data that ``"dwq"`` trains scales and biases for.
        hessian_memory: bytes of input Hessians held at once (``in_features^2`` float32 per layer): the layers
            are calibrated in parts of whole transformer blocks that fit, one pass over the data per part.

    Returns:
        The format chosen for each converted layer, ``{name: MetalConfig}`` (a per-layer config that
        :func:`metalq.quantize_` also takes).

    The float model is read, never modified, until every layer is built; then all are swapped in at once,
    so an error or Ctrl-C leaves ``model`` untouched.

    Example:
        >>> metalq.calibrate(model, MetalConfig(bits=3), texts, tokenizer=tokenizer, method="gptq")
    """
    if method not in METHODS:
        raise ValueError(f"calibrate: method must be one of {METHODS}, got {method!r}")
    config_for = _config_resolver(config)
    targets = []
    for fqns, linear in _find(model, _is_linear, "calibrate"):
        chosen = config_for(linear, fqns[0])
        if chosen is None:
            continue
        if chosen.mode != "affine":
            raise ValueError(f"calibrate: {fqns[0]}: method {method!r} chooses affine codes; mode is {chosen.mode!r}")
        targets.append((fqns, linear, chosen))
    tied = {id(e.weight): e for e in model.modules() if isinstance(e, nn.Embedding)} if embeddings else {}
    needs_data = method in DATA_METHODS or bpw is not None
    batches = None
    if needs_data or calibration is not None:
        if method == "rtn" and bpw is None:
            raise ValueError("calibrate: method 'rtn' takes no calibration data")
        batches = calibration_batches(model, calibration, tokenizer, batch_size, max_length)
        forward = forward or default_forward
    teacher = teacher_targets(model, batches, forward) if method == "dwq" else None
    full = method in DATA_METHODS  # the full input Hessian; the clip search weighs columns by its diagonal only
    diagonals = {}  # one pass for the diagonals that mixed precision and the clip search share
    if batches is not None and (bpw is not None or not full):
        diagonals = collect_hessians(model, [linear for _, linear, _ in targets], batches, forward, diagonal=True)
    formats = {fqns[0]: (chosen.bits, chosen.group_size) for fqns, linear, chosen in targets}
    if bpw is not None:
        formats = choose_formats({fqns[0]: (linear.weight, diagonals[id(linear)]) for fqns, linear, _ in targets},
                                 bpw, list(candidates))
    plan, misfits = [], []
    for fqns, linear, _ in targets:
        if id(linear.weight) in tied:
            continue  # a tied head reads its embedding's table
        bits, group_size = formats[fqns[0]]
        if linear.in_features % axis_multiple(bits, group_size):
            misfits.append(fqns[0])
            continue
        plan.append((fqns, linear, bits, group_size))
    if misfits:
        raise ValueError(f"calibrate: in_features of {', '.join(misfits)} is not a multiple of its group size")
    codes_method = {"dwq": "gptq", "awq": "clip"}.get(method, method)
    built, sources = [], {}  # sources: AWQ's scaled float copies, quantized or swapped in instead of the model's own
    with tqdm(total=len(plan), desc=f"calibrate ({method})", unit="layer", leave=False) as progress:
        for part in _passes(plan, hessian_memory if full else None):
            hessians = collect_hessians(model, [linear for _, linear, _, _ in part], batches, forward) if full \
                else diagonals
            if method == "awq":
                copies, hessians = apply_awq(model, {fqns[0]: linear for fqns, linear, _, _ in part}, hessians,
                                             formats)
                sources.update(copies)
            for fqns, linear, bits, group_size in part:
                source = sources.pop(fqns[0], linear)
                built.append((fqns, quantize_linear(source, bits, group_size, codes_method,
                                                    hessians.pop(id(linear), None), damping)))
                progress.update()
    built += [((name,), module) for name, module in sources.items()]  # AWQ's scaled norms
    if embeddings:
        built += _quantized_embeddings(model, config_for, method, tied, targets)
    originals = [(fqns, model.get_submodule(fqns[0])) for fqns, _ in built]
    _swap_in(model, built)
    if method == "dwq":
        try:
            learn_scales_and_biases(model, batches, teacher, forward, epochs)
        except BaseException:  # Ctrl-C included: the float model comes back whole
            _swap_in(model, originals)
            raise
    return {fqns[0]: MetalConfig(bits=bits, group_size=group_size) for fqns, _, bits, group_size in plan}


def _passes(plan: list, budget: Optional[int]) -> list[list]:
    """``plan`` in consecutive parts whose Hessians (``in_features^2`` float32 per layer) fit in ``budget``
    bytes (``None``: one part). A transformer block (the layers under one numbered module, ``layers.3``) is
    never split, so AWQ finds each fold whole; a block larger than the budget is a part of its own."""
    if budget is None:
        return [plan]
    parts, size, block = [], 0, None
    for entry in plan:
        name, cost = entry[0][0], 4 * entry[1].in_features ** 2
        here = _block_of(name)
        if not parts or (here != block or here is None) and size + cost > budget:
            parts.append([])
            size = 0
        parts[-1].append(entry)
        size, block = size + cost, here
    return parts


def _block_of(name: str) -> Optional[str]:
    """The numbered module a layer belongs to (``model.layers.3`` of ``model.layers.3.mlp.up_proj``)."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:index + 1])
    return None


def _swap_in(model: nn.Module, modules: list) -> None:
    for fqns, module in modules:
        for fqn in fqns:
            model.set_submodule(fqn, module)


def quantize_linear(linear: nn.Linear, bits: int, group_size: int, method: str,
                    hessian: Optional[torch.Tensor] = None, damping: float = DAMPING):
    """One layer by ``method`` (``"rtn"``, ``"clip"`` or ``"gptq"``): a MetalLinear. ``hessian``: its input
    Hessian, or for ``"clip"`` just its diagonal."""
    if method == "rtn":
        return MetalLinear.from_linear(linear, bits, group_size)
    weight = linear.weight.detach()
    if method == "gptq":
        codes, scales, biases = gptq_quantize(weight, hessian, bits, group_size, weight.dtype, damping)
    else:
        importance = hessian if hessian is None or hessian.dim() == 1 else torch.diag(hessian)
        codes, scales, biases = clip_search(weight, bits, group_size, importance, weight.dtype)
    return metal_linear_from_codes(linear, codes, scales, biases, bits, group_size)


def collect_hessians(model: nn.Module, layers: list[nn.Linear], batches: list, forward: Forward,
                     diagonal: bool = False) -> dict:
    """``{id(layer): X^T X / tokens}`` of each layer's inputs over the calibration batches (float32, on the
    layer's device), from one pass of the float model; with ``diagonal`` only its diagonal (the mean squared
    input per channel). Positions a batch's ``attention_mask`` marks as padding are left out."""
    sums = {id(layer): torch.zeros((layer.in_features,) * (1 if diagonal else 2), device=layer.weight.device)
            for layer in layers}
    counts = dict.fromkeys(sums, 0)
    padding = {}  # the running batch's attention mask: padded positions stay out of the Hessians

    def record(layer, args):
        x = args[0].detach()
        mask = padding.get("mask")
        if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
            x = x[mask.to(x.device).bool()]
        x = x.reshape(-1, layer.in_features).float()
        if diagonal:
            sums[id(layer)].add_(x.pow(2).sum(0))
        else:
            sums[id(layer)].addmm_(x.mT, x)
        counts[id(layer)] += x.shape[0]

    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        with torch.no_grad():
            for index, batch in enumerate(tqdm(batches, desc="calibration", unit="batch", leave=False)):
                padding["mask"] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                try:
                    forward(model, batch)
                except (RuntimeError, TypeError, ValueError) as error:
                    shape = {k: tuple(getattr(v, "shape", ())) for k, v in batch.items()} \
                        if isinstance(batch, Mapping) else tuple(getattr(batch, "shape", ()))
                    raise ValueError(f"calibration batch {index} ({shape}) does not fit the model: {error}") from error
    finally:
        for handle in handles:
            handle.remove()
    unused = [layer for layer in layers if counts[id(layer)] == 0]
    if unused:
        raise ValueError(f"calibration: {len(unused)} selected layer(s) never ran on the calibration data")
    return {key: total / counts[key] for key, total in sums.items()}


def _quantized_embeddings(model, config_for, method, tied, targets):
    """Embedding tables (data-free: RTN, or the clip search for every other method) and their tied heads."""
    built = []
    heads = {id(linear.weight): (fqns, linear) for fqns, linear, _ in targets if id(linear.weight) in tied}
    for fqns, embedding in _find(model, lambda m, fqn: isinstance(m, nn.Embedding), "calibrate"):
        chosen = config_for(embedding, fqns[0])
        if chosen is None or embedding.embedding_dim % axis_multiple(chosen.bits, chosen.group_size):
            continue
        table = MetalEmbedding.from_embedding(embedding, chosen.bits, chosen.group_size)
        if method != "rtn":
            codes, scales, biases = clip_search(embedding.weight.detach(), chosen.bits, chosen.group_size)
            table.weight = pack(codes.to(torch.uint8), chosen.bits)
            table.scales = scales.to(table.scales.dtype)
            table.qbiases = biases.to(table.qbiases.dtype)
        built.append((fqns, table))
        if id(embedding.weight) in heads:
            head_fqns, head = heads[id(embedding.weight)]
            built.append((head_fqns, MetalTiedHead(table, head.bias)))
    return built


__all__ = ["calibrate", "quantize_linear", "collect_hessians", "bits_per_weight", "METHODS", "DATA_METHODS"]
