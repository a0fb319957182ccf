"""Calibration data as the user has it (texts with a tokenizer, token ids, input tensors, dicts, a DataLoader),
turned into model calls, with errors that say what is wrong before any work is done."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn

Forward = Callable[[nn.Module, Any], Any]


def default_forward(model: nn.Module, batch) -> Any:
    """``model(**batch)`` for a dict of model inputs (``input_ids``, ``attention_mask``...), ``model(batch)``
    otherwise; float tensors for a model with token embeddings go in as ``inputs_embeds``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if batch.is_floating_point() and _input_embedding(model) is not None:
        return model(inputs_embeds=batch)
    return model(batch)


def _input_embedding(model: nn.Module) -> Optional[nn.Embedding]:
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    return embedding if isinstance(embedding, nn.Embedding) else None


def _first_embedding(model: nn.Module) -> Optional[nn.Embedding]:
    return _input_embedding(model) or next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)


def calibration_batches(model: nn.Module, calibration, tokenizer=None, batch_size: int = 8,
                        max_length: int = 512) -> list:
    """The calibration batches, checked: a list of dicts or tensors ready for ``forward(model, batch)``.

    Accepted: a list of texts (with ``tokenizer``, or a model with its own ``tokenize`` such as a
    SentenceTransformer); an integer tensor of token ids ``(sequences, length)`` or ``(length,)``; a float
    tensor of model inputs (``inputs_embeds`` for a model with token embeddings); a dict of model inputs; or any
    iterable of such tensors or dicts (a DataLoader), each one batch.
    """
    if calibration is None:
        raise ValueError("calibration: this method learns from data; pass texts, token ids or a DataLoader")
    if isinstance(calibration, str):
        raise TypeError("calibration: a single string; pass a list of texts (one sample each)")
    if isinstance(calibration, torch.Tensor):
        tensor = calibration.unsqueeze(0) if calibration.dim() == 1 else calibration
        batches = list(tensor.split(batch_size)) if tensor.numel() else []
    elif isinstance(calibration, Mapping):
        batches = [calibration]
    elif isinstance(calibration, Iterable):
        items = list(calibration)
        if items and all(isinstance(item, str) for item in items):
            batches = _tokenized(model, items, tokenizer, batch_size, max_length)
        else:
            batches = items
    else:
        raise TypeError(f"calibration: expected texts, a tensor, a dict or an iterable of batches, got "
                        f"{type(calibration).__name__}")
    if not batches:
        raise ValueError("calibration: no samples (an empty list, tensor or DataLoader)")
    for index, batch in enumerate(batches):
        _check_batch(model, batch, index)
    return batches


def _tokenized(model, texts, tokenizer, batch_size, max_length):
    if tokenizer is None and callable(getattr(model, "tokenize", None)):
        return [model.tokenize(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    if tokenizer is None:
        raise TypeError("calibration: texts need a tokenizer; pass tokenizer=AutoTokenizer.from_pretrained(...)")
    # without a pad token (common for causal LMs) one text per batch: padding is never invented
    pads = getattr(tokenizer, "pad_token", None) is not None
    step = batch_size if pads else 1
    return [dict(tokenizer(texts[i:i + step], return_tensors="pt", padding=pads, truncation=True,
                           max_length=max_length)) for i in range(0, len(texts), step)]


def _check_batch(model: nn.Module, batch, index: int) -> None:
    tensors = batch.items() if isinstance(batch, Mapping) else [("batch", batch)]
    embedding, hidden = _first_embedding(model), _input_embedding(model)
    for name, tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        where = f"calibration batch {index}, {name}"
        if tensor.numel() == 0:
            raise ValueError(f"{where}: empty tensor of shape {tuple(tensor.shape)}")
        if tensor.dtype in (torch.bool, torch.uint32, torch.uint64) or tensor.is_complex():
            raise TypeError(f"{where}: dtype {tensor.dtype}; token ids are int64/int32, model inputs float")
        if tensor.is_floating_point():
            if name in ("batch", "inputs_embeds") and hidden is not None and tensor.shape[-1] != hidden.embedding_dim:
                raise ValueError(f"{where}: float inputs of hidden size {tensor.shape[-1]}, but the model's is "
                                 f"{hidden.embedding_dim}")
        elif name in ("batch", "input_ids") and embedding is not None:
            low, high = int(tensor.min()), int(tensor.max())
            if low < 0 or high >= embedding.num_embeddings:
                raise ValueError(f"{where}: token ids span [{low}, {high}], outside the vocabulary "
                                 f"[0, {embedding.num_embeddings})")
