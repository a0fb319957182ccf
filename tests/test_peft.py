"""QLoRA with PEFT on metalq layers: wrapping, gradients against float64, autocast, checkpointing, memory, a
fine-tune, merging both ways, adapter save and load, transformers' Trainer, and the bad inputs."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import metalq
from metalq import MetalConfig, MetalLinear, MetalTiedHead

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
import metalq.peft as mp  # noqa: E402
import metalq.transformers as mt  # noqa: E402
from metalq.peft import QuantizedLoraLinear  # noqa: E402

from conftest import require_mlx  # noqa: E402

VOCAB = 256
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed=0, tie=False, hidden=64, dtype=torch.float32):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, initializer_range=0.1,
    )
    return transformers.LlamaForCausalLM(config).to(dtype)


def quantized_llama(seed=0, bits=4, group_size=32, **kwargs):
    model = tiny_llama(seed, **kwargs)
    metalq.quantize_(model, MetalConfig(bits=bits, group_size=group_size))
    return model


def lora_config(**kwargs):
    kwargs.setdefault("r", 4)
    kwargs.setdefault("lora_alpha", 8)
    kwargs.setdefault("target_modules", "all-linear")
    kwargs.setdefault("init_lora_weights", False)  # random B: the adapter changes the output from the start
    return peft.LoraConfig(**kwargs)


def dequantized(layer) -> torch.Tensor:
    return mp.layers.dequantized_weight(layer).double()


class Projection(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


FORMATS = [(bits, 64, "affine") for bits in (1, 2, 3, 4, 5, 6, 8)] + [(4, 32, "affine"), (4, 128, "affine")] + [
    (None, None, mode) for mode in ("mxfp4", "nvfp4", "mxfp8")
]


@pytest.mark.parametrize("bits,group_size,mode", FORMATS)
def test_lora_output_and_gradients_match_float64(bits, group_size, mode):
    torch.manual_seed(1)
    base = MetalLinear.from_linear(nn.Linear(256, 96), bits=bits, group_size=group_size, mode=mode)
    model = mp.get_peft_model(Projection(base), lora_config(target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    assert isinstance(layer, QuantizedLoraLinear) and layer.get_base_layer() is base
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 5, 256, requires_grad=True)
    grad_out = torch.randn(3, 5, 96)
    model(x).backward(grad_out)

    # the same function in float64 on the dequantized weight, differentiated by torch
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    weight = dequantized(base)
    y64 = x64 @ weight.T + base.bias.double() + layer.scaling["default"] * (x64 @ a64.T) @ b64.T
    y64.backward(grad_out.double())
    torch.testing.assert_close(model(x).double(), y64, rtol=1e-5, atol=1e-5)
    for ours, exact in ((x.grad, x64.grad), (a.grad, a64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-5)
    assert all(not t.requires_grad for t in base.buffers()) and base.bias.grad is None  # the base stays frozen


def test_all_linear_covers_quantized_layers_but_not_the_head():
    model = quantized_llama()
    targets = mp.linear_targets(model)
    assert targets == {f"model.layers.{i}.{part}.{name}" for i in range(2) for part, names in
                       (("self_attn", LINEARS[:4]), ("mlp", LINEARS[4:])) for name in names}
    wrapped = mp.get_peft_model(model, lora_config())
    kinds = {type(m) for n, m in wrapped.named_modules() if n.endswith(LINEARS)}
    assert kinds == {QuantizedLoraLinear}
    assert isinstance(wrapped.base_model.model.lm_head, MetalLinear)


def test_plain_peft_without_registration_fails_as_the_issue_reports():
    # the reason metalq.peft exists: PEFT alone rejects the quantized layer
    with pytest.raises(ValueError, match="not supported"):
        peft.get_peft_model(quantized_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))


def loaders(tmp_path):
    """The same quantized Llama three ways: metalq.quantize_, metalq.transformers.from_pretrained, and
    transformers' own loader with use_metalq_kernel()."""
    float_model = tiny_llama(3)
    directory = tmp_path / "llama-4bit"
    metalq.save_quantized(float_model, directory, MetalConfig(bits=4, group_size=64))
    quantized = copy.deepcopy(float_model)
    metalq.quantize_(quantized, MetalConfig(bits=4, group_size=64))
    mt.use_metalq_kernel()
    return {
        "quantize_": quantized,
        "metalq.transformers": mt.from_pretrained(directory, device="cpu"),
        "transformers": transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32),
    }


@pytest.fixture
def metalq_kernel():
    from transformers.integrations import metal_quantization
    from transformers.quantizers import auto

    saved = metal_quantization._metal_kernel, auto.AUTO_QUANTIZER_MAPPING["metal"]
    yield
    metal_quantization._metal_kernel, auto.AUTO_QUANTIZER_MAPPING["metal"] = saved


def test_wraps_models_from_every_loader(tmp_path, metalq_kernel):
    ids = torch.randint(0, VOCAB, (2, 7))
    for how, model in loaders(tmp_path).items():
        with torch.no_grad():
            before = model(input_ids=ids).logits
        wrapped = mp.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))  # B = 0 at first
        layers = [m for m in wrapped.modules() if isinstance(m, QuantizedLoraLinear)]
        assert len(layers) == 14, how
        wrapped.train()
        out = wrapped(input_ids=ids, labels=ids)
        with torch.no_grad():
            torch.testing.assert_close(out.logits, before, rtol=0, atol=0, msg=how)
        out.loss.backward()
        grads = [p.grad for n, p in wrapped.named_parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), how
        assert any(g.abs().sum() > 0 for g in grads), how
        assert all("lora_" in n for n, p in wrapped.named_parameters() if p.requires_grad), how


def test_unsupported_targets_and_variants_are_clear_errors_and_change_nothing():
    model = tiny_llama()
    metalq.quantize_(model, MetalConfig(bits=4, group_size=32), embeddings=True)
    before = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match=r"model\.embed_tokens is a MetalEmbedding"):
        mp.get_peft_model(model, lora_config(target_modules=["q_proj", "embed_tokens"]))
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    tied = tiny_llama(tie=True)
    metalq.quantize_(tied, MetalConfig(bits=4, group_size=32), embeddings=True)
    assert isinstance(tied.lm_head, MetalTiedHead)
    with pytest.raises(ValueError, match=r"lm_head is a MetalTiedHead"):
        mp.get_peft_model(tied, lora_config(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="DoRA"):
        mp.get_peft_model(quantized_llama(), lora_config(use_dora=True))
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        mp.get_peft_model(quantized_llama(), lora_config(fan_in_fan_out=True))
    with pytest.raises(TypeError, match="LoraConfig"):
        mp.get_peft_model(quantized_llama(), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))


class OpRecorder(TorchDispatchMode):
    """Records the dtype of every metalq product's activations and the shape of every float tensor produced."""

    def __init__(self):
        super().__init__()
        self.qmm_dtypes, self.shapes = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "metalq":
            self.qmm_dtypes.append(args[0].dtype)
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                self.shapes.add(tuple(tensor.shape))
        return out


def train_step(model, ids, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_autocast_runs_the_quantized_products_in_bfloat16():
    model = mp.get_peft_model(quantized_llama(), lora_config())
    model.train()
    ids = torch.randint(0, VOCAB, (2, 7))
    loss32, grads32 = train_step(model, ids)
    with OpRecorder() as recorder:
        loss16, grads16 = train_step(model, ids, autocast=True)
    assert recorder.qmm_dtypes and set(recorder.qmm_dtypes) == {torch.bfloat16}  # forward and backward products
    assert torch.isfinite(loss16) and abs(loss16 - loss32) < 0.05 * loss32
    for name, grad in grads32.items():
        assert grads16[name].dtype == torch.float32  # the LoRA factors stay float32 parameters
        cosine = torch.nn.functional.cosine_similarity(grads16[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.98, name


def test_gradient_checkpointing_gives_the_same_gradients():
    model = mp.get_peft_model(quantized_llama(), lora_config())
    model.train()
    ids = torch.randint(0, VOCAB, (2, 7))
    loss, grads = train_step(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    assert model.base_model.model.model.gradient_checkpointing
    loss_ckpt, grads_ckpt = train_step(model, ids)
    torch.testing.assert_close(loss_ckpt, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_prepare_model_for_kbit_training_and_reentrant_checkpointing():
    model = peft.prepare_model_for_kbit_training(quantized_llama(), use_gradient_checkpointing=True)
    model = mp.get_peft_model(model, lora_config())
    model.train()
    loss, grads = train_step(model, torch.randint(0, VOCAB, (2, 7)))
    assert torch.isfinite(loss) and all(g.abs().sum() > 0 for g in grads.values())


def test_training_never_materialises_a_float_base_weight():
    model = mp.get_peft_model(quantized_llama(hidden=128), lora_config())
    model.train()
    weight_shapes = {
        shape for m in model.modules() if isinstance(m, QuantizedLoraLinear)
        for shape in ((m.out_features, m.in_features), (m.in_features, m.out_features))
    }
    ids = torch.randint(0, VOCAB, (3, 5))  # 15 tokens: no activation is shaped like a weight
    with OpRecorder() as recorder:
        train_step(model, ids)
    assert recorder.qmm_dtypes  # the products ran through metalq's ops
    assert not recorder.shapes & weight_shapes


def test_fine_tuning_a_4bit_llama_lowers_the_loss():
    torch.manual_seed(0)
    model = mp.get_peft_model(quantized_llama(bits=4, group_size=32), peft.LoraConfig(r=8, target_modules="all-linear"))
    model.train()
    # a toy task: continue a fixed sequence (counting by 3), which the random base model does not know
    ids = (torch.arange(24).repeat(4, 1) * 3 + torch.arange(4)[:, None] * 7) % VOCAB
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def merged_pair(quantized, **kwargs):
    model = mp.get_peft_model(quantized_llama(bits=4, group_size=32, **kwargs), lora_config())
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
              if isinstance(m, QuantizedLoraLinear)}
    expected = {n: (dequantized(m.get_base_layer()) + m.get_delta_weight("default").detach().double(),
                    m.get_base_layer())
                for n, m in layers.items()}
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    merged = mp.merge_and_unload(model, quantized=quantized)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    return merged, expected, logits, merged_logits


def test_merge_into_float_equals_dequantized_base_plus_delta():
    merged, expected, logits, merged_logits = merged_pair(quantized=False)
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in merged.modules())
    for name, (weight, _) in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32
        torch.testing.assert_close(layer.weight.double(), weight, rtol=1e-6, atol=1e-7)  # one float32 rounding
    torch.testing.assert_close(merged_logits, logits, rtol=1e-4, atol=1e-4)


def test_merge_requantized_is_mlx_quantize_of_base_plus_delta():
    mx = require_mlx()
    merged, expected, logits, merged_logits = merged_pair(quantized=True)
    for name, (weight, base) in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is MetalLinear and (layer.bits, layer.group_size) == (base.bits, base.group_size)
        assert layer.weight.nbytes == base.weight.nbytes
        # the float32 sum the merge quantizes, quantized by MLX: the same codes, scales and biases
        codes, scales, biases = mx.quantize(mx.array(weight.float().numpy()), group_size=base.group_size,
                                            bits=base.bits)
        assert np.array_equal(np.array(codes), layer.weight.numpy()), name
        assert np.array_equal(np.array(scales), layer.scales.numpy()) and np.array_equal(np.array(biases),
                                                                                        layer.qbiases.numpy())
        step = layer.scales.double().abs().repeat_interleave(layer.group_size, dim=1)
        assert ((dequantized(layer) - weight).abs() <= step + 1e-6).all(), name  # mx.quantize's own bound
    # the model changed only by one more 4-bit rounding of every adapted weight
    assert torch.nn.functional.cosine_similarity(merged_logits.flatten(), logits.flatten(), dim=0) > 0.95


def test_unmerge_restores_the_quantized_base_exactly():
    model = mp.get_peft_model(quantized_llama(), lora_config())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.get_base_layer()
    packed = {n: t.clone() for n, t in base.named_buffers()}
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        model.merge_adapter()
        assert layer.merged and isinstance(layer.get_base_layer(), MetalLinear) and layer.get_base_layer() is not base
        model.unmerge_adapter()
        assert layer.get_base_layer() is base and all(torch.equal(t, packed[n]) for n, t in base.named_buffers())
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_merge_that_cannot_be_represented_is_an_error_and_changes_nothing():
    # a LoRA bias has nowhere to go on a base layer without a bias; q_proj merges fine, but no layer may change
    model = mp.get_peft_model(quantized_llama(), lora_config(target_modules=["q_proj", "o_proj"], lora_bias=True))
    before = [(n, type(m)) for n, m in model.named_modules()]
    for quantized in (True, False):
        with pytest.raises(ValueError, match="lora_bias=True.*has no bias"):
            mp.merge_and_unload(model, quantized=quantized)
        assert [(n, type(m)) for n, m in model.named_modules()] == before
        assert not any(m.merged for m in model.modules() if isinstance(m, QuantizedLoraLinear))


def test_lora_on_a_base_with_a_bias_merges_its_lora_bias():
    torch.manual_seed(2)
    base = MetalLinear.from_linear(nn.Linear(128, 64), bits=4, group_size=32)
    model = mp.get_peft_model(Projection(base), lora_config(target_modules=["proj"], lora_bias=True))
    with torch.no_grad():
        model.base_model.model.proj.lora_B["default"].bias.normal_()
        x = torch.randn(4, 128)
        expected = model(x)
        merged = mp.merge_and_unload(model, quantized=False)
        torch.testing.assert_close(merged(x), expected, rtol=1e-5, atol=1e-5)


def test_adapters_save_and_load_onto_a_metalq_base(tmp_path):
    model = mp.get_peft_model(quantized_llama(seed=5), lora_config())
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = mp.from_pretrained(quantized_llama(seed=5), tmp_path / "adapter")
    assert isinstance(loaded.base_model.model.model.layers[1].mlp.down_proj, QuantizedLoraLinear)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, logits)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference unless is_trainable=True
    trainable = mp.from_pretrained(quantized_llama(seed=5), tmp_path / "adapter", is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_an_adapter_that_does_not_fit_the_base_is_an_error_and_changes_nothing(tmp_path):
    mp.get_peft_model(quantized_llama(hidden=128), lora_config()).save_pretrained(tmp_path / "wide")
    base = quantized_llama(hidden=64)
    before = [(n, type(m)) for n, m in base.named_modules()]
    with pytest.raises(ValueError, match=r"lora_A\.weight has shape \[4, \d+\], which does not fit .* \(in_features="):
        mp.from_pretrained(base, tmp_path / "wide")
    assert [(n, type(m)) for n, m in base.named_modules()] == before


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def trainer_losses(model, tmp_path):
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=12, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=4, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    rows = (torch.arange(16).repeat(8, 1) * 3 + torch.arange(8)[:, None] * 5) % VOCAB
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=TokenDataset(list(rows)))
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_transformers_trainer_trains_every_kind_of_metalq_model(tmp_path, metalq_kernel):
    for how, model in loaders(tmp_path).items():
        model = mp.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear"))
        losses = trainer_losses(model, tmp_path)
        assert len(losses) == 3 and losses[-1] < losses[0], (how, losses)


def test_readme_qlora_example_runs_as_written(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## QLoRA"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (QLoRA)", "exec"), {})
    losses = [float(line.split()[-1]) for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").is_file()
    reloaded = mt.from_pretrained(tmp_path / "my-model-4bit", device="cpu")
    assert sum(isinstance(m, MetalLinear) for m in reloaded.modules()) == 14
