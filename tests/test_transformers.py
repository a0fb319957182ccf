"""metalq.transformers: quantized Llama/Qwen2 checkpoints loaded through metalq, against float64 and MLX oracles."""
import copy
import importlib.util
import json

import numpy as np
import pytest
import torch

import metalq
from metalq import MetalConfig, MetalEmbedding, MetalLinear, MetalTiedHead

from conftest import require, require_mlx

transformers = pytest.importorskip("transformers")
import metalq.transformers as mt  # noqa: E402
from metalq.checkpoint import save_quantized  # noqa: E402

VOCAB = 320
COMMON = dict(
    vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, dtype="float32",
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
# mlx-lm 0.32 reads `rope_theta` (default 1e6 for Qwen2), transformers 5 writes `rope_parameters`: use Qwen2's 1e6
QWEN2_ROPE = dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
# name -> (config, MetalConfig, quantize embeddings, checkpoint format). Qwen2 has q/k/v biases and ties its
# head to the embedding: float and tied (what transformers' Metal path itself reads: Linear layers only), or
# quantized with a MetalTiedHead reading the same table, in either layout.
MODELS = {
    "llama-4bit-gs64-metal": (
        lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=False),
        MetalConfig(bits=4, group_size=64, modules_to_not_convert=["lm_head"]),
        False,
        "metal",
    ),
    "qwen2-8bit-gs128-metal": (
        lambda: transformers.Qwen2Config(**COMMON, **QWEN2_ROPE, tie_word_embeddings=True),
        MetalConfig(bits=8, group_size=128, modules_to_not_convert=["lm_head"]),
        False,
        "metal",
    ),
    "qwen2-3bit-gs32-metal-tied": (
        lambda: transformers.Qwen2Config(**COMMON, **QWEN2_ROPE, tie_word_embeddings=True),
        MetalConfig(bits=3, group_size=32),
        True,
        "metal",
    ),
    "qwen2-3bit-gs32-mlx-tied": (
        lambda: transformers.Qwen2Config(**COMMON, **QWEN2_ROPE, tie_word_embeddings=True),
        MetalConfig(bits=3, group_size=32),
        True,
        "mlx",
    ),
}


def build(name: str, seed: int = 0):
    make_config = MODELS[name][0]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(), attn_implementation="sdpa").eval()
    for module in model.modules():  # random, non-zero biases and norms so that every tensor matters
        for param_name in ("bias", "weight"):
            param = getattr(module, param_name, None)
            if isinstance(param, torch.nn.Parameter) and param.dim() == 1:
                with torch.no_grad():
                    param.copy_(torch.randn_like(param) * 0.1 + (1.0 if param_name == "weight" else 0.0))
    return model


@pytest.fixture(scope="module", params=sorted(MODELS))
def checkpoint(request, tmp_path_factory):
    """(name, quantized in-memory model, directory saved by metalq in the model's checkpoint format)."""
    name = request.param
    _, config, embeddings, layout = MODELS[name]
    model = build(name)
    metalq.quantize_(model, config, embeddings=embeddings)
    directory = tmp_path_factory.mktemp(name) / "checkpoint"
    if layout == "metal" and (embeddings or config.bits not in (2, 4, 8)):  # only metalq's loader reads these
        with pytest.warns(UserWarning, match="transformers' own loader cannot read this Metal checkpoint"):
            save_quantized(model, directory, format=layout)
    else:
        save_quantized(model, directory, format=layout)
    return name, model, directory


def prompts():
    return [[5, 17, 33, 9, 70, 101, 4], [250, 3], [44, 45, 46, 47], [300]]


def left_pad(rows, pad=0):
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_loads_quantized_modules_and_matches_float64(checkpoint):
    name, original, directory = checkpoint
    _, config, embeddings, layout = MODELS[name]
    written = json.loads((directory / "config.json").read_text())
    assert ("quantization" in written) == (layout == "mlx")
    assert written["quantization_config"].get("quant_method") == ("metal" if layout == "metal" else None)
    model = mt.from_pretrained(directory, device="cpu")
    linears = [m for m in model.modules() if isinstance(m, MetalLinear)]
    assert len(linears) == 7 * 2 + (0 if "lm_head" in (config.modules_to_not_convert or ()) else 1) - embeddings
    assert all((m.bits, m.group_size) == (config.bits, config.group_size) for m in linears)
    if embeddings:
        assert isinstance(model.model.embed_tokens, MetalEmbedding)
        assert isinstance(model.lm_head, MetalTiedHead) and model.lm_head.embedding is model.model.embed_tokens
    else:
        assert type(model.model.embed_tokens) is torch.nn.Embedding and type(model.lm_head) is torch.nn.Linear
        tied = model.config.tie_word_embeddings
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    # the packed tensors round-trip unchanged
    saved = original.state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[key]), key

    ids, mask = left_pad(prompts())
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        reference = copy.deepcopy(model)
        metalq.dequantize_(reference)
        assert not any(isinstance(m, (MetalLinear, MetalEmbedding, MetalTiedHead)) for m in reference.modules())
        exact = reference.double()(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    error = (logits.double() - exact)[real].abs().max().item()
    assert error <= 1e-4 * exact[real].abs().max().item(), error
    assert exact[real].std() > 0.5  # logits large enough for the tolerance to mean something


def test_batched_left_padded_generation_equals_one_by_one(checkpoint):
    _, _, directory = checkpoint
    model = mt.from_pretrained(directory, device="cpu")
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    ids, mask = left_pad(prompts())
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, **settings)
        for row, prompt in enumerate(prompts()):
            alone = model.generate(input_ids=torch.tensor([prompt]), **settings)[0, len(prompt):]
            assert batched[row, ids.shape[1]:].tolist() == alone.tolist(), f"prompt {row}"
    assert len(set(map(tuple, batched[:, ids.shape[1]:].tolist()))) > 1  # not a degenerate model


@pytest.fixture
def metalq_kernel():
    """use_metalq_kernel() for one test; transformers' globals are restored afterwards."""
    from transformers.integrations import metal_quantization
    from transformers.quantizers import auto

    saved = metal_quantization._metal_kernel, auto.AUTO_QUANTIZER_MAPPING["metal"]
    mt.use_metalq_kernel(quantizer=False)
    assert auto.AUTO_QUANTIZER_MAPPING["metal"] is saved[1]  # quantizer=False swaps only the kernel
    mt.use_metalq_kernel()
    assert issubclass(auto.AUTO_QUANTIZER_MAPPING["metal"], saved[1])
    yield
    metal_quantization._metal_kernel, auto.AUTO_QUANTIZER_MAPPING["metal"] = saved


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_metal_linear_runs_on_metalq(bias, dtype, metalq_kernel):
    from transformers.integrations import metal_quantization

    assert metal_quantization._get_metal_kernel().affine_qmm_t is metalq.affine_qmm_t
    torch.manual_seed(4)
    ours = MetalLinear.from_linear(torch.nn.Linear(256, 96, bias=bias, dtype=dtype), bits=4, group_size=64)
    theirs = metal_quantization.MetalLinear(256, 96, bias=bias, bits=4, group_size=64)
    theirs.load_state_dict(ours.state_dict(), assign=True)
    x = torch.randn(3, 5, 256, dtype=dtype)
    expected = x.double() @ ours.dequantize().weight.double().T + (ours.bias.double() if bias else 0)
    out = theirs(x)
    assert out.shape == (3, 5, 96)
    assert out.dtype == dtype and torch.equal(out, ours(x))  # the same kernel call
    tol = 1e-4 if dtype is torch.float32 else 5e-2
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * 4)


# transformers reads its own Metal layout, with float embeddings, only
@pytest.mark.parametrize(
    "checkpoint", sorted(n for n, (_, _, embeddings, layout) in MODELS.items() if layout == "metal" and not embeddings),
    indirect=True,
)
def test_transformers_from_pretrained_stays_quantized_on_cpu(checkpoint, metalq_kernel):
    name, _, directory = checkpoint
    from transformers.integrations import metal_quantization

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    layers = [m for m in model.modules() if isinstance(m, metal_quantization.MetalLinear)]
    assert len(layers) == 14 and all(m.weight.dtype == torch.uint32 for m in layers)
    assert model.device.type == "cpu"
    ours = mt.from_pretrained(directory, device="cpu")
    ids, mask = left_pad(prompts())
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits, ours(input_ids=ids, attention_mask=mask).logits,
            rtol=1e-5, atol=1e-5,
        )


def test_rejects_float_checkpoint(tmp_path):
    model = build("llama-4bit-gs64-metal")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        mt.from_pretrained(tmp_path)


# ---- an mlx_lm.convert output, against mlx-lm's own forward ------------------------------------------------

def save_word_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="w1", eos_token="w2", pad_token="w0", unk_token="w3"
    )
    fast.save_pretrained(directory)


@pytest.mark.parametrize("name,bits,group_size", [("qwen2-3bit-gs32-mlx-tied", 4, 64), ("llama-4bit-gs64-metal", 6, 32)])
def test_mlx_lm_convert_output(tmp_path, name, bits, group_size):
    mx = require_mlx()
    require(importlib.util.find_spec("mlx_lm") is not None, "mlx-lm (pip install mlx-lm)")
    from mlx_lm import convert, load

    float_dir, mlx_dir = tmp_path / "float", tmp_path / "mlx"
    build(name, seed=7).save_pretrained(float_dir)
    save_word_tokenizer(float_dir)
    convert(str(float_dir), str(mlx_dir), quantize=True, q_bits=bits, q_group_size=group_size)
    config = json.loads((mlx_dir / "config.json").read_text())
    assert config["quantization"]["bits"] == bits

    model = mt.from_pretrained(mlx_dir, device="cpu")
    assert isinstance(model.model.embed_tokens, MetalEmbedding)  # mlx-lm quantizes embeddings too
    tied = MODELS[name][0]().tie_word_embeddings
    assert isinstance(model.lm_head, MetalTiedHead if tied else MetalLinear)
    reference, _ = load(str(mlx_dir))

    prompt = prompts()[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0]
    expected = torch.from_numpy(np.array(reference(mx.array([prompt]))[0]).astype(np.float32))
    # mlx-lm accumulates in float32 too, in another order: agreement to float32 rounding of the logit scale
    scale = expected.abs().max().item()
    assert (logits - expected).abs().max().item() <= 1e-4 * scale
    assert expected.std() > 0.5

    tokens = list(prompt)
    for _ in range(20):  # mlx-lm greedy decoding, full recompute per token
        tokens.append(int(np.array(reference(mx.array([tokens]))[0, -1].argmax())))
    with torch.no_grad():
        generated = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0
        )
    assert generated[0].tolist() == tokens
