"""Tiny GGUF files for the tests, written with gguf-py's GGUFWriter from transformers models.

Legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) are quantized by gguf-py itself; gguf-py cannot quantize the K types,
so their blocks are valid random ones (bytes drawn at random, with float16 super-block constants set to sizes that
give weights of about the model's scale). Llama's q/k rows are permuted as llama.cpp's converter does.
"""
from __future__ import annotations

import numpy as np
import torch

gguf = __import__("gguf")
T = gguf.GGMLQuantizationType

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}
# where each K type keeps its float16 super-block constants (byte offsets d, dmin) and what d gives weights of ~0.03
K_CONSTANTS = {"Q2_K": (80, 82, 0.01), "Q3_K": (108, None, 0.001), "Q4_K": (0, 2, 0.003), "Q5_K": (0, 2, 0.0015),
               "Q6_K": (208, None, 0.0005)}


def random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid random blocks of a K type (or MXFP4) for a ``(rows, cols)`` tensor, as GGUFWriter takes them."""
    qtype = T[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    if kind == "MXFP4":
        raw[:, 0] = rng.integers(118, 124, raw.shape[0])  # scales 2^-9 .. 2^-4
    else:
        d_at, dmin_at, d = K_CONSTANTS[kind]
        for at in (d_at, dmin_at):
            if at is not None:
                values = rng.uniform(0.5 * d, 1.5 * d, raw.shape[0]).astype(np.float16)
                raw[:, at:at + 2] = values.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


def quantized_bytes(weight: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind in ("F32", "F16", "BF16"):
        return weight.astype({"F32": np.float32, "F16": np.float16}.get(kind, np.float32))
    if kind in LEGACY:
        return gguf.quants.quantize(weight.astype(np.float32), T[kind])
    return random_blocks(kind, *weight.shape, rng)


def llama_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for q_proj / k_proj (transformers' GGUF loader undoes it)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def write_gguf(path, model, types, seed: int = 0, extra_tensors=()) -> dict[str, str]:
    """Write ``model`` (a transformers causal LM) as a GGUF file; ``types(gguf_name, shape)`` gives each 2-D weight's
    ggml type name (norms and biases stay F32). Returns ``{gguf name: type name}``."""
    config = model.config
    arch = ARCHITECTURES[config.model_type]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("metalq-test")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    writer.add_rope_freq_base((rope.get("full_attention") or rope)["rope_theta"])  # Gemma 3 has one per kind
    writer.add_vocab_size(config.vocab_size)
    if arch == "gemma3":
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
        writer.add_uint32(f"{arch}.attention.sliding_window", config.sliding_window)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(config.vocab_size - 3)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([2, 3, 3] + [6] * (len(tokens) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config.num_hidden_layers)
    written = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes a tied head once, as token_embd
        if arch != "llama" or "rotary" not in hf_name:
            base, suffix = hf_name.rsplit(".", 1)
            name = names.get_name(base)
            if name is None:
                continue
            name = f"{name}.{suffix}"
            weight = tensor.detach().float().numpy()
            if arch == "gemma3" and base.endswith("norm"):
                weight = weight + 1  # llama.cpp stores Gemma's norms as 1 + weight
            if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
                weight = llama_permute(weight, heads)
            kind = types(name, weight.shape) if weight.ndim == 2 else "F32"
            data = quantized_bytes(weight, kind, rng)
            writer.add_tensor(name, data, raw_dtype=T[kind] if kind not in ("F32", "F16") else None)
            written[name] = kind
    for name, data, kind in extra_tensors:
        writer.add_tensor(name, data, raw_dtype=T[kind])
        written[name] = kind
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def tiny_model(model_type: str = "llama", seed: int = 0, tie: bool = False, hidden: int = 256):
    """A random transformers causal LM; hidden 256 so that every K type (256-weight blocks) fits each matrix."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
                  initializer_range=0.05)
    if model_type == "llama":
        config = transformers.LlamaConfig(**common)
    elif model_type == "qwen2":
        config = transformers.Qwen2Config(**common)
    else:
        config = transformers.Gemma3TextConfig(**common, head_dim=hidden // 4, sliding_window=64)
    return transformers.AutoModelForCausalLM.from_config(config).eval()
