"""Mixture-of-experts: MetalSwitchLinear, transformers' fused experts on metalq, MoE checkpoints.

Oracles: float64 products of the dequantized expert matrices; ``mx.quantize`` for the packed stacks;
transformers' own float experts forward; ``mlx_lm.convert`` / ``mlx_lm.load`` and mlx-lm's forward for
mlx-lm checkpoints.
"""
import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

import metalq
import metalq.moe
from conftest import require, require_mlx
from metalq import MetalConfig, MetalExperts, MetalLinear, MetalSwitchLinear, load_quantized, save_quantized

transformers = pytest.importorskip("transformers")
import metalq.transformers as mt  # noqa: E402
from test_transformers import VOCAB, save_word_tokenizer  # noqa: E402


# ---- MetalSwitchLinear ----------------------------------------------------------------------------------

def float64_gather(x, layer, indices):
    """``x[b] @ dequantize(weight[indices[b]]).T (+ bias)`` one batch element at a time, in float64."""
    weights = layer.dequantize().double()
    batch = torch.broadcast_shapes(x.shape[:-2], indices.shape)
    xs = x.double().expand(*batch, *x.shape[-2:]).reshape(-1, *x.shape[-2:])
    ids = indices.expand(batch).reshape(-1)
    rows = []
    for b in range(ids.numel()):
        y = xs[b] @ weights[ids[b]].T
        rows.append(y if layer.bias is None else y + layer.bias[ids[b]].double())
    return torch.stack(rows).reshape(*batch, x.shape[-2], layer.out_features)


@pytest.mark.parametrize("bits,group_size,bias", [(4, 64, False), (3, 32, True), (8, 128, False), (6, 16, True)])
@pytest.mark.parametrize("rows", [1, 3])
def test_switch_linear_matches_float64_loop(bits, group_size, bias, rows):
    torch.manual_seed(bits * rows)
    weight = torch.randn(6, 40, 256)
    layer = MetalSwitchLinear.from_float(weight, torch.randn(6, 40) if bias else None, bits=bits, group_size=group_size)
    x = torch.randn(7, 1, rows, 256)
    indices = torch.randint(0, 6, (7, 2))
    y = layer(x, indices)
    assert y.shape == (7, 2, rows, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), float64_gather(x, layer, indices), rtol=1e-5, atol=1e-4)
    # the pairs grouped by expert, as MetalExperts and mlx-lm's SwitchGLU send them
    order = indices.reshape(-1).argsort()
    pairs = x.expand(7, 2, rows, 256).reshape(14, rows, 256)
    grouped = layer(pairs[order], indices.reshape(-1)[order], sorted_indices=True)
    assert torch.equal(grouped, y.reshape(14, rows, 40)[order])


def test_switch_linear_packs_each_expert_like_mlx():
    mx = require_mlx()
    torch.manual_seed(1)
    weight = torch.randn(4, 24, 128)
    layer = MetalSwitchLinear.from_float(weight, bits=5, group_size=32)
    wq, scales, biases = mx.quantize(mx.array(weight.numpy()), group_size=32, bits=5)
    assert layer.weight.shape == (4, 24, 128 * 5 // 32) and layer.weight.dtype == torch.uint32
    assert np.array_equal(np.array(wq.view(mx.int32)), layer.weight.view(torch.int32).numpy())
    assert np.array_equal(np.array(scales), layer.scales.numpy())
    assert np.array_equal(np.array(biases), layer.qbiases.numpy())
    assert set(layer.state_dict()) == {"weight", "scales", "qbiases"}
    assert repr(layer) == ("MetalSwitchLinear(num_experts=4, in_features=128, out_features=24, bias=False, bits=5, "
                           "group_size=32)")


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: MetalSwitchLinear.from_float(torch.randn(24, 128)), r"weight must be \(num_experts, out_features"),
        (lambda: MetalSwitchLinear.from_float(torch.randn(2, 24, 128), torch.randn(24)),
         r"bias must have shape \(2, 24\)"),
        (lambda: MetalSwitchLinear(2, 96, 8, group_size=64), "in_features=96 must be divisible by group_size=64"),
        (lambda: MetalSwitchLinear(2, 64, 8, bits=7), "bits must be one of"),
    ],
    ids=["2-d", "bias-shape", "group-size-misfit", "bits"],
)
def test_switch_linear_rejects(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---- tiny transformers MoE models ----------------------------------------------------------------------

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, initializer_range=0.2, dtype="float32", bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)
# expert counts and widths that fit group sizes 32 and 64; Qwen2-MoE adds a shared expert, Mixtral is the
# block mlx-lm spells `block_sparse_moe`, OLMoE normalises q and k, GPT-OSS stores its experts (E, in, out) with
# biases, gate and up interleaved and its own clamped gate
FAMILIES = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_experts_per_tok=2, head_dim=16,
        norm_topk_prob=True,
    ),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **COMMON, intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=128, num_experts=8,
        num_experts_per_tok=2,
    ),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, intermediate_size=128, num_local_experts=4,
                                                  num_experts_per_tok=2),
    "olmoe": lambda: transformers.OlmoeConfig(**COMMON, intermediate_size=64, num_experts=8, num_experts_per_tok=2),
    "gpt_oss": lambda: transformers.GptOssConfig(
        **COMMON, intermediate_size=64, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention"] * 2, rope_parameters={"rope_type": "default", "rope_theta": 150000.0},
    ),
}


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    for module in model.modules():  # random norms so that every tensor matters
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 1:
            with torch.no_grad():
                weight.copy_(torch.randn_like(weight) * 0.1 + 1.0)
    return model


def experts_paths(model):
    return [name for name, module in model.named_modules() if metalq.moe.expert_projections(module) is not None]


def with_dequantized_experts(float_model, quantized):
    """``float_model`` with each experts module's matrices replaced by the quantized model's dequantized ones."""
    reference = copy.deepcopy(float_model)
    for name, module in quantized.named_modules():
        if isinstance(module, MetalExperts):
            experts = reference.get_submodule(name)
            for projection, layer in module.projections():
                weight = layer.dequantize()
                experts._parameters[projection] = nn.Parameter(
                    weight.transpose(-1, -2).contiguous() if experts.is_transposed else weight
                )
        elif isinstance(module, MetalLinear):
            reference.get_submodule(name).weight = nn.Parameter(module.dequantize().weight)
    return reference


def assert_close_to_scale(actual, expected, relative):
    """Elementwise agreement to ``relative`` times the largest expected magnitude (float32 rounding of logits)."""
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= relative * expected.abs().max().item(), error


def token_batch(seed=0, tokens=40):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (2, tokens), generator=generator)


@pytest.mark.parametrize("group_size", [32, 16], ids=lambda g: f"gs{g}")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantize_swaps_every_experts_module_and_matches_dequantized_reference(family, group_size):
    model = build(family)
    paths = experts_paths(model)
    assert len(paths) == 2
    reference_float = copy.deepcopy(model)
    metalq.quantize_(model, MetalConfig(bits=4, group_size=group_size))
    for path in paths:
        experts = model.get_submodule(path)
        assert isinstance(experts, MetalExperts)
        float_experts = reference_float.get_submodule(path)
        for name, layer in experts.projections():
            assert isinstance(layer, MetalSwitchLinear) and (layer.bits, layer.group_size) == (4, group_size)
            count, rows, columns = float_experts._parameters[name].shape
            stored = (count, columns, rows) if float_experts.is_transposed else (count, rows, columns)
            assert (layer.num_experts, layer.out_features, layer.in_features) == stored
    assert not [n for n, p in model.named_parameters() if p.dim() == 3]  # no float expert matrix left
    reference = with_dequantized_experts(reference_float, model)
    ids = token_batch()
    with torch.no_grad():
        logits = model(ids).logits
        expected = reference(ids).logits
    assert_close_to_scale(logits, expected, 1e-5)
    assert expected.std() > 0.5  # logits large enough for the tolerance to mean something


def test_quantize_honours_skip_lists_and_per_layer_formats():
    model = build("qwen3_moe")
    config = {
        "model.layers.0.mlp.experts": MetalConfig(bits=8, group_size=64),
        "_default": MetalConfig(bits=3, group_size=32, modules_to_not_convert=["model.layers.1.mlp.experts"]),
    }
    metalq.quantize_(model, config)
    first, second = (model.get_submodule(f"model.layers.{i}.mlp.experts") for i in range(2))
    assert isinstance(first, MetalExperts) and all((l.bits, l.group_size) == (8, 64) for _, l in first.projections())
    assert type(second) is transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts
    assert isinstance(model.model.layers[1].self_attn.q_proj, MetalLinear)
    # a filter sees the experts module too
    model = build("qwen3_moe")
    metalq.quantize_(model, MetalConfig(), filter_fn=lambda module, fqn: not fqn.endswith("experts"))
    assert not any(isinstance(module, MetalExperts) for module in model.modules())


def test_experts_whose_width_fits_no_group_size_stay_float():
    config = FAMILIES["qwen3_moe"]()
    config.moe_intermediate_size = 48  # down_proj's in_features: 48 % 32 != 0
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.experts \(in_features=\[64, 48\], group_size=32\)"):
        metalq.quantize_(model, MetalConfig(bits=4, group_size=32))
    assert not any(isinstance(module, MetalExperts) for module in model.modules())


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_grouped_and_ungrouped_routing_agree_with_transformers(family, monkeypatch):
    model = build(family)
    float_model = copy.deepcopy(model)
    metalq.quantize_(model, MetalConfig(bits=4, group_size=64))
    reference = with_dequantized_experts(float_model, model)
    ids = token_batch(tokens=48)  # 96 token-expert pairs per batch row
    outputs = {}
    with torch.no_grad():
        for name, threshold in (("grouped", 0), ("ungrouped", 10**9)):
            monkeypatch.setattr(metalq.moe, "SORT_MIN_PAIRS", threshold)
            outputs[name] = model(ids).logits
        expected = reference(ids).logits
    assert torch.equal(outputs["grouped"], outputs["ungrouped"])
    assert_close_to_scale(outputs["grouped"], expected, 1e-5)


@pytest.mark.parametrize("tokens", [5, 40], ids=["ungrouped", "grouped"])
def test_gradients_reach_the_input_like_float64(tokens):
    """LoRA-style training on a frozen quantized MoE: d(output)/d(hidden) through MetalExperts."""
    model = build("qwen2_moe")
    metalq.quantize_(model, MetalConfig(bits=4, group_size=64))
    experts = model.model.layers[0].mlp.experts
    exact = experts.dequantize().double()  # transformers' own float experts forward, in float64
    exact.config = copy.copy(exact.config)
    exact.config._experts_implementation = "eager"  # the grouped_mm default has no float64 kernel
    torch.manual_seed(tokens)
    hidden = torch.randn(tokens, 64)
    routing = torch.randn(tokens, 8).softmax(-1).topk(2)
    cotangent = torch.randn(tokens, 64)
    x = hidden.clone().requires_grad_()
    (experts(x, routing.indices, routing.values) * cotangent).sum().backward()
    x64 = hidden.double().requires_grad_()
    (exact(x64, routing.indices, routing.values.double()) * cotangent.double()).sum().backward()
    assert_close_to_scale(x.grad, x64.grad, 1e-5)


def test_dequantize_restores_the_float_experts():
    model = build("qwen2_moe")
    metalq.quantize_(model, MetalConfig(bits=4, group_size=64))
    restored = copy.deepcopy(model)
    metalq.dequantize_(restored)
    experts = restored.model.layers[0].mlp.experts
    assert type(experts) is transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeExperts
    assert torch.equal(experts.down_proj, model.model.layers[0].mlp.experts.down_proj.dequantize())
    ids = token_batch()
    with torch.no_grad():
        assert_close_to_scale(restored(ids).logits, model(ids).logits, 1e-5)


# ---- checkpoints -----------------------------------------------------------------------------------------

def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    "family,layout",
    # GPT-OSS's interleaved experts have no mlx-lm switch_mlp layout
    [("qwen3_moe", "metal"), ("qwen3_moe", "mlx"), ("mixtral", "metal"), ("mixtral", "mlx"), ("gpt_oss", "metal")],
)
def test_save_load_round_trip_bit_exact(tmp_path, family, layout):
    model = build(family)
    metalq.quantize_(model, {"model.layers.1.mlp.experts": MetalConfig(bits=8, group_size=64),
                             "_default": MetalConfig(bits=4, group_size=32)} if layout == "mlx" else MetalConfig())
    save_quantized(model, tmp_path / "out", format=layout)
    with torch.device("meta"):
        fresh = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())
    fresh = load_quantized(fresh, tmp_path / "out")
    assert_same_state(model, fresh)
    loaded = mt.from_pretrained(tmp_path / "out", device="cpu")
    assert_same_state(model, loaded)
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_mlx_export_is_what_mlx_lm_loads(tmp_path):
    """metalq's mlx layout: switch_mlp names, gate and up split, Mixtral's block spelled as mlx-lm does."""
    require_mlx_lm()
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model = build("mixtral")
    metalq.quantize_(model, MetalConfig(bits=4, group_size=64))
    save_quantized(model, tmp_path / "out", format="mlx")
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    prefix = "model.layers.0.block_sparse_moe.switch_mlp"
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj
    for leaf, ours in (("weight", gate_up.weight), ("scales", gate_up.scales), ("biases", gate_up.qbiases)):
        halves = [torch.from_numpy(np.array(weights[f"{prefix}.{piece}.{leaf}"].view(mx.int32)
                                            if leaf == "weight" else weights[f"{prefix}.{piece}.{leaf}"]))
                  for piece in ("gate_proj", "up_proj")]
        assert torch.equal(torch.cat(halves, dim=1), ours.view(torch.int32) if leaf == "weight" else ours)
    assert not any(".mlp." in name for name in weights)
    set_rope_theta_for_mlx_lm(tmp_path / "out")
    reference, _ = load_model(tmp_path / "out")
    ids = token_batch()[:1]
    with torch.no_grad():
        logits = model(ids).logits[0]
    expected = torch.from_numpy(np.array(reference(mx.array(ids.numpy()))[0]))
    assert (logits - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


def _drop_up_scales(directory):
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.switch_mlp.up_proj.scales"]
    save_file(tensors, str(path), metadata={"format": "mlx"})


def _split_gate_format(directory):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["quantization"]["model.layers.0.mlp.switch_mlp.gate_proj"] = {"bits": 8, "group_size": 64}
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "breaker,match",
    [
        (_drop_up_scales, r"missing tensor 'model\.layers\.1\.mlp\.switch_mlp\.up_proj\.scales'"),
        (_split_gate_format, r"gate_proj and .*up_proj have different formats.*experts\.gate_up_proj holds them"),
    ],
    ids=["missing-up-scales", "gate-up-formats-differ"],
)
def test_mlx_experts_errors_leave_model_untouched(tmp_path, breaker, match):
    model = build("qwen3_moe")
    metalq.quantize_(model, MetalConfig(bits=4, group_size=64))
    save_quantized(model, tmp_path / "out", format="mlx")
    breaker(tmp_path / "out")
    target = build("qwen3_moe", seed=2)
    modules, state = dict(target.named_modules()), copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=match):
        load_quantized(target, tmp_path / "out")
    assert dict(target.named_modules()) == modules
    assert all(torch.equal(tensor, state[key]) for key, tensor in target.state_dict().items())


def test_interleaved_experts_have_no_mlx_layout(tmp_path):
    model = build("gpt_oss")
    metalq.quantize_(model, MetalConfig(bits=4, group_size=32))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts: interleaved gate/up experts have no mlx-lm"):
        save_quantized(model, tmp_path / "out", format="mlx")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_moe_models(tmp_path):
    build("qwen3_moe").save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match="convert does not handle mixture-of-experts models"):
        metalq.convert_checkpoint(tmp_path / "float", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_with_config_asks_to_quantize_experts_first(tmp_path):
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts holds float experts"):
        save_quantized(build("olmoe"), tmp_path / "out", MetalConfig())
    assert not (tmp_path / "out").exists()


# ---- mlx_lm.convert outputs, against mlx-lm's own forward -----------------------------------------------

def require_mlx_lm():
    require_mlx()
    require(importlib.util.find_spec("mlx_lm") is not None, "mlx-lm (pip install mlx-lm)")
    import mlx_lm

    return mlx_lm


def set_rope_theta_for_mlx_lm(directory):
    """mlx-lm 0.32 reads ``rope_theta`` and ``num_experts``; transformers 5 writes ``rope_parameters`` and, for
    Qwen3-MoE, ``num_local_experts``: state the same values under mlx-lm's keys."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    if "num_local_experts" in config and config["model_type"] != "mixtral":
        config.setdefault("num_experts", config["num_local_experts"])
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"])
def converted(request, tmp_path_factory):
    """(family, an ``mlx_lm.convert`` 4-bit gs64 output of a random tiny model of that family)."""
    mlx_lm = require_mlx_lm()
    family = request.param
    root = tmp_path_factory.mktemp(family)
    build(family, seed=7).save_pretrained(root / "float")
    save_word_tokenizer(root / "float")
    set_rope_theta_for_mlx_lm(root / "float")
    mlx_lm.convert(str(root / "float"), str(root / "mlx"), quantize=True, q_bits=4, q_group_size=64)
    return family, root / "mlx"


def test_mlx_lm_convert_output_matches_mlx_lm(converted):
    mx = require_mlx()
    mlx_lm = require_mlx_lm()
    family, directory = converted
    quantization = json.loads((directory / "config.json").read_text())["quantization"]
    model = mt.from_pretrained(directory, device="cpu")
    experts = [model.get_submodule(path) for path in experts_paths(model)]
    assert len(experts) == 2 and all(isinstance(e, MetalExperts) for e in experts)
    assert all((l.bits, l.group_size) == (4, 64) for e in experts for _, l in e.projections())
    # the router is quantized in the checkpoint (Qwen3-MoE: at 8 bits, an mlx-lm per-layer override); it is
    # loaded as the float matrix it encodes
    weights = mx.load(str(directory / "model.safetensors"))
    block = "block_sparse_moe" if family == "mixtral" else "mlp"
    router = {leaf: weights[f"model.layers.0.{block}.gate.{leaf}"] for leaf in ("weight", "scales", "biases")}
    bits = quantization.get(f"model.layers.0.{block}.gate", {}).get("bits", 4)
    assert bits == (8 if family == "qwen3_moe" else 4)
    matrix = mx.dequantize(router["weight"], router["scales"], router["biases"], group_size=64, bits=bits)
    assert np.array_equal(model.model.layers[0].mlp.gate.weight.detach().numpy(), np.array(matrix))

    reference, _ = mlx_lm.load(str(directory))
    prompt = token_batch(seed=3, tokens=40)[0].tolist()  # 80 token-expert pairs: mlx-lm and metalq group them
    for tokens in (prompt, prompt[:12]):  # and 24 pairs: neither does
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tokens])).logits[0]
        expected = torch.from_numpy(np.array(reference(mx.array([tokens]))[0]))
        scale = expected.abs().max().item()
        assert (logits - expected).abs().max().item() <= 1e-4 * scale
        assert expected.std() > 0.5

    tokens = prompt[:12]
    for _ in range(10):  # mlx-lm greedy decoding, full recompute per token
        tokens.append(int(np.array(reference(mx.array([tokens]))[0, -1].argmax())))
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([prompt[:12]]), max_new_tokens=10, min_new_tokens=10,
                                   do_sample=False, pad_token_id=0)
    assert generated[0].tolist() == tokens


def test_replace_pre_quantized_shells_take_a_metal_state_dict():
    quantized = build("olmoe")
    metalq.quantize_(quantized, MetalConfig(bits=4, group_size=64))
    model = build("olmoe", seed=1)
    metalq.replace_with_metal_linear(model, quantization_config=MetalConfig(bits=4, group_size=64), pre_quantized=True)
    shells = [module for module in model.modules() if isinstance(module, MetalExperts)]
    assert len(shells) == 2 and all(not layer.weight.any() for e in shells for _, layer in e.projections())
    model.load_state_dict(quantized.state_dict())
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, quantized(ids).logits)
