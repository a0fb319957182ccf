"""metalq.peft's mlx-lm adapters: trained by mlx_lm.lora and loaded in PyTorch, saved from PyTorch and loaded by
mlx-lm, with mlx-lm's own forward and generation as the oracle."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import require, require_mlx

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
import metalq.peft as mp  # noqa: E402
import metalq.transformers as mt  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

VOCAB = 256
TOKENS = [5, 17, 33, 9, 70, 101, 4, 200, 18, 64]
# both sides multiply in float32 over at most 128 terms, in different orders, through two blocks: agreement to a
# few float32 roundings of the logit scale (measured: under 2.5e-6 of it). The adapters move logits by over half
# of that scale, so a wrong factor, transpose or scale cannot pass.
TOLERANCE = 2e-5


def tiny_llama(seed: int = 0, tie: bool = False):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1, dtype="float32",
        tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def save_word_tokenizer(directory):
    """Token i is the word ``w{i}``: mlx-lm's training and generation need a tokenizer, any will do."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="w1", eos_token="w2", pad_token="w0", unk_token="w3"
    ).save_pretrained(directory)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An mlx_lm.convert output, 4-bit gs64 (embedding and head quantized too)."""
    require_mlx()
    require(importlib.util.find_spec("mlx_lm") is not None, "mlx-lm (pip install mlx-lm)")
    from mlx_lm import convert

    root = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(root / "float")
    save_word_tokenizer(root / "float")
    convert(str(root / "float"), str(root / "mlx"), quantize=True, q_bits=4, q_group_size=64)
    return root / "mlx"


def mlx_logits(base, adapter=None):
    mx = require_mlx()
    from mlx_lm import load

    model, _ = load(str(base), adapter_path=None if adapter is None else str(adapter))
    return torch.from_numpy(np.array(model(mx.array([TOKENS]))[0]))


def torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([TOKENS])).logits[0]


def assert_close(logits, expected):
    scale = expected.abs().max().item()
    assert (logits - expected).abs().max().item() <= TOLERANCE * scale


def lora_layer_names(model):
    modules = model.get_base_model().named_modules()
    return {name for name, module in modules if isinstance(module, mp.QuantizedLoraLinear)}


# ---- mlx_lm.lora -> PyTorch -----------------------------------------------------------------------------------

# name -> (mlx_lm.lora arguments, lora_parameters for its config file or None for its defaults)
TRAININGS = {
    "default-keys": (["--num-layers", "2"], None),
    "keys-last-block-and-head": (
        ["--num-layers", "1"],
        {"rank": 4, "scale": 10.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj", "lm_head"]},
    ),
}


@pytest.fixture(scope="module", params=sorted(TRAININGS))
def trained(request, base, tmp_path_factory):
    """(name, an adapter directory written by a real mlx_lm.lora run on CPU)."""
    arguments, lora_parameters = TRAININGS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    data = root / "data"
    data.mkdir()
    for split, rows in (("train", 16), ("valid", 2)):
        texts = [" ".join(f"w{(7 * row + 3 * i) % 200 + 4}" for i in range(12)) for row in range(rows)]
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    if lora_parameters is not None:
        (root / "config.yaml").write_text(json.dumps({"lora_parameters": lora_parameters}))  # JSON is YAML
        arguments = arguments + ["--config", str(root / "config.yaml")]
    command = [
        sys.executable, "-m", "mlx_lm", "lora", "--model", str(base), "--train", "--data", str(data),
        "--iters", "5", "--batch-size", "2", "--learning-rate", "5e-3", "--val-batches", "1",
        "--steps-per-eval", "1000", "--save-every", "1000", "--seed", "0", "--adapter-path", str(root / "adapter"),
        *arguments,
    ]
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    return request.param, root / "adapter"


def test_mlx_lm_trained_adapter_loads_onto_metalq(base, trained):
    name, adapter = trained
    factors = load_file(str(adapter / "adapters.safetensors"))
    assert all(tensor.abs().max() > 1e-3 for key, tensor in factors.items() if key.endswith("lora_b"))  # trained
    model = mp.load_mlx_adapter(mt.from_pretrained(base, device="cpu"), adapter)
    assert isinstance(model, peft.PeftModel) and not model.training
    assert not any(parameter.requires_grad for parameter in model.parameters())
    assert lora_layer_names(model) == {key.rsplit(".", 1)[0] for key in factors}  # mlx-lm's choice of layers
    if name == "keys-last-block-and-head":
        layers = {f"model.layers.1.self_attn.{key}" for key in ("q_proj", "v_proj")}
        assert lora_layer_names(model) == layers | {"lm_head"}
    key = "model.layers.1.self_attn.q_proj"  # factors transposed into PEFT's layout, exactly
    layer = model.get_base_model().get_submodule(key)
    assert torch.equal(layer.lora_A["default"].weight, factors[f"{key}.lora_a"].T)
    assert torch.equal(layer.lora_B["default"].weight, factors[f"{key}.lora_b"].T)

    expected, without = mlx_logits(base, adapter), mlx_logits(base)
    assert (expected - without).abs().max() > 0.1 * expected.abs().max()  # the adapter matters
    assert expected.std() > 0.5
    assert_close(torch_logits(model), expected)


def test_loaded_adapter_trains_further(base, trained):
    _, adapter = trained
    model = mp.load_mlx_adapter(mt.from_pretrained(base, device="cpu"), adapter, adapter_name="mlx", is_trainable=True)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and all(".lora_A.mlx." in name or ".lora_B.mlx." in name for name in trainable)
    ids = torch.tensor([TOKENS])
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(parameter.grad is not None for parameter in model.parameters() if parameter.requires_grad)


# ---- PyTorch -> mlx-lm ------------------------------------------------------------------------------------------

# name -> (LoraConfig arguments, the num_layers and keys mlx-lm's rule needs to pick the same layers)
EXPORTS = {
    "every-block": (dict(target_modules=["q_proj", "v_proj", "down_proj"]),
                    (2, ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"])),
    "last-block": (dict(target_modules=["o_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers"),
                   (1, ["mlp.up_proj", "self_attn.o_proj"])),
    "first-block-and-head": (dict(target_modules=["model.layers.0.self_attn.k_proj", "lm_head"]),
                             (2, ["lm_head", "model.layers.0.self_attn.k_proj"])),  # by full name
}


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_pytorch_adapter_loads_in_mlx_lm(base, tmp_path, name):
    options, (num_layers, keys) = EXPORTS[name]
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=6, lora_dropout=0.1, init_lora_weights=False, **options)
    model = mp.get_peft_model(mt.from_pretrained(base, device="cpu"), config).eval()
    written = mp.save_mlx_adapter(model, tmp_path / "adapter")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]  # nothing left beside it
    settings = json.loads((written / "adapter_config.json").read_text())
    assert settings == {"fine_tune_type": "lora", "num_layers": num_layers,
                        "lora_parameters": {"rank": 4, "scale": 1.5, "dropout": 0.1, "keys": keys}}

    logits, expected = torch_logits(model), mlx_logits(base, written)
    assert (expected - mlx_logits(base)).abs().max() > 0.1 * expected.abs().max()
    assert_close(logits, expected)

    again = mp.load_mlx_adapter(mt.from_pretrained(base, device="cpu"), written)  # and back, unchanged
    assert lora_layer_names(again) == lora_layer_names(model)
    assert torch.equal(torch_logits(again), logits)


def test_mlx_lm_generate_with_exported_adapter(base, tmp_path):
    from mlx_lm import generate, load, stream_generate

    torch.manual_seed(2)
    config = peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    model = mp.get_peft_model(mt.from_pretrained(base, device="cpu"), config).eval()
    mp.save_mlx_adapter(model, tmp_path / "adapter")
    reference, tokenizer = load(str(base), adapter_path=str(tmp_path / "adapter"))
    text = generate(reference, tokenizer, prompt=TOKENS, max_tokens=8)
    tokens = [response.token for response in stream_generate(reference, tokenizer, TOKENS, max_tokens=8)]
    assert text == tokenizer.decode(tokens) and len(tokens) > 1
    with torch.no_grad():
        generated = model.generate(input_ids=torch.tensor([TOKENS]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert generated[0, len(TOKENS):len(TOKENS) + len(tokens)].tolist() == tokens  # greedy, both sides


# ---- what an mlx-lm adapter cannot hold -------------------------------------------------------------------------

def quantized_peft_model(base, **options):
    return mp.get_peft_model(mt.from_pretrained(base, device="cpu"), peft.LoraConfig(r=4, **options))


def float_peft_model(base, tie: bool = False, **options):
    return peft.get_peft_model(tiny_llama(tie=tie), peft.LoraConfig(r=4, **options))


# name -> (builds the PeftModel from the base directory, the error message)
REFUSED = {
    "lora-bias": (lambda base: quantized_peft_model(base, target_modules=["q_proj"], lora_bias=True), "lora_bias=True"),
    "alpha-pattern": (lambda base: quantized_peft_model(base, target_modules=["q_proj", "v_proj"],
                                                        alpha_pattern={"v_proj": 32}), "alpha_pattern"),
    "rank-pattern": (lambda base: quantized_peft_model(base, target_modules=["q_proj", "v_proj"],
                                                       rank_pattern={"v_proj": 2}), "rank_pattern"),
    "modules-to-save": (lambda base: quantized_peft_model(base, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                        "sets modules_to_save"),
    "dora": (lambda base: float_peft_model(base, target_modules=["q_proj"], use_dora=True), "DoraLinearVariant"),
    "embedding": (lambda base: float_peft_model(base, target_modules=["embed_tokens"]), "linear layers only"),
    "tied-head": (lambda base: float_peft_model(base, tie=True, target_modules=["lm_head"]), "tied to the embedding"),
    "adapter-name": (lambda base: peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]),
                                                      adapter_name="other"), r"no adapter 'default' \(it has"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_save_refuses_what_mlx_lm_cannot_express(base, tmp_path, name):
    make, message = REFUSED[name]
    model = make(base)
    with pytest.raises(ValueError, match=message):
        mp.save_mlx_adapter(model, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []  # not even a temporary directory


LORA = {"rank": 4, "scale": 2.0, "dropout": 0.0}


def adapter_config(num_layers=2, fine_tune_type="lora", lora_parameters=LORA):
    return {"fine_tune_type": fine_tune_type, "num_layers": num_layers, "lora_parameters": lora_parameters}


Q = "model.layers.1.self_attn.q_proj"
FITTING = {f"{Q}.lora_a": torch.randn(64, 4), f"{Q}.lora_b": torch.randn(4, 64)}
# name -> (adapters.safetensors, adapter_config.json, the error message)
BAD_ADAPTERS = {
    "dora": (FITTING, adapter_config(fine_tune_type="dora"), "fine_tune_type='dora'"),
    "full": (FITTING, adapter_config(fine_tune_type="full"), "fine_tune_type='full'"),
    "alpha-not-scale": (FITTING, adapter_config(lora_parameters={"rank": 4, "alpha": 8, "dropout": 0.0}),
                        "no scale .mlx-lm spells"),
    "shape": ({f"{Q}.lora_a": torch.randn(64, 8), f"{Q}.lora_b": torch.randn(8, 64)}, adapter_config(),
              rf"{Q}.lora_a has shape \[64, 8\]"),
    "transposed": ({f"{Q}.lora_a": torch.randn(4, 64)}, adapter_config(), rf"{Q}.lora_a has shape \[4, 64\]"),
    "unknown-module": ({"model.layers.1.self_attn.rotary.lora_a": torch.randn(64, 4)}, adapter_config(),
                       "'model.layers.1.self_attn.rotary', which is not a linear layer"),
    "outside-num-layers": ({"model.layers.0.self_attn.q_proj.lora_a": torch.randn(64, 4)}, adapter_config(num_layers=1),
                           "not a layer adapter_config.json's num_layers and keys put LoRA on"),
    "not-a-factor": ({f"{Q}.weight": torch.randn(64, 64)}, adapter_config(), f"{Q}.weight is not a LoRA factor"),
    "unknown-key": (FITTING, adapter_config(lora_parameters={**LORA, "keys": ["self_attn.q_proj", "self_attn.qq"]}),
                    r"keys \['self_attn.qq'\] name no linear layer"),
    "no-keys": (FITTING, adapter_config(lora_parameters={**LORA, "keys": []}), "put LoRA on no layer"),
    "too-many-layers": (FITTING, adapter_config(num_layers=3), "num_layers=3 but the model has 2 blocks"),
}


@pytest.mark.parametrize("name", sorted(BAD_ADAPTERS))
def test_load_refuses_bad_adapters_and_leaves_the_model_unchanged(base, tmp_path, name):
    tensors, config, message = BAD_ADAPTERS[name]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(tensors, str(adapter / "adapters.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    model = mt.from_pretrained(base, device="cpu")
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    kinds = [type(module) for module in model.modules()]
    with pytest.raises(ValueError, match=message):
        mp.load_mlx_adapter(model, adapter)
    assert [type(module) for module in model.modules()] == kinds
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)
