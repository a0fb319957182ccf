"""GGUF files loaded without dequantizing: every mapped ggml type against gguf-py's dequantize, tiny models against
transformers' own (dequantizing) GGUF loader, the tensor-level reader, convert, and the bad files."""
import json
import warnings

import numpy as np
import pytest
import torch

import metalq
from metalq import MetalEmbedding, MetalLinear, MetalTiedHead

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
import gguf_files as gf  # noqa: E402
import metalq.transformers as mt  # noqa: E402
from metalq.checkpoint.gguf_blocks import FORMATS  # noqa: E402

T = gguf.GGMLQuantizationType
ROWS, COLUMNS = 24, 512


def one_tensor_file(path, kind, seed=0):
    """A GGUF file holding one (ROWS, COLUMNS) weight of ``kind`` and its raw bytes."""
    rng = np.random.default_rng(seed)
    raw = gf.quantized_bytes((rng.standard_normal((ROWS, COLUMNS)) * 0.05).astype(np.float32), kind, rng)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_down.weight", raw, raw_dtype=T[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return raw


def assert_same_values(ours: torch.Tensor, expected: np.ndarray):
    """Equal value for value; the bit patterns may differ only in the sign of zero (ggml's d * 0 is -0 for a
    negative d, metalq's d * q - d * q is +0)."""
    ours = ours.numpy()
    assert np.array_equal(ours, expected)
    differ = ours.view(np.uint32) != expected.view(np.uint32)
    assert (ours[differ] == 0).all()


def test_block_sizes_are_ggmls():
    for kind, spec in FORMATS.items():
        assert (spec.block, spec.nbytes) == gguf.GGML_QUANT_SIZES[T[kind]], kind


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_every_type_dequantizes_as_gguf_py(tmp_path, kind):
    raw = one_tensor_file(tmp_path / "one.gguf", kind)
    tensor = metalq.read_gguf(tmp_path / "one.gguf")["blk.0.ffn_down.weight"]
    spec = FORMATS[kind]
    assert (tensor.ggml_type, tensor.bits, tensor.group_size, tensor.mode) == (kind, spec.bits, spec.group_size,
                                                                                spec.mode)
    assert tensor.weight.dtype == torch.uint32 and tensor.weight.shape == (ROWS, COLUMNS * spec.bits // 32)
    expected = gguf.quants.dequantize(raw, T[kind]).reshape(ROWS, COLUMNS)
    assert_same_values(tensor.dequantize(), expected)
    # the product runs on the packed tensors, against float64 on gguf-py's weight
    x = torch.randn(3, COLUMNS)
    if tensor.mode == "affine":
        y = metalq.affine_qmm_t(x, tensor.weight, tensor.scales.float(), tensor.biases.float(), tensor.group_size,
                                tensor.bits)
    else:
        y = metalq.fp_qmm_t(x, tensor.weight, tensor.scales, tensor.mode)
    exact = x.double() @ torch.from_numpy(expected).double().T
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_every_type_runs_on_the_metal_emulator(tmp_path, lib, kind):
    from test_metal_fp import emulate_fp_qmm
    from test_metal_qmv import emulate_qmm

    one_tensor_file(tmp_path / "one.gguf", kind)
    tensor = metalq.read_gguf(tmp_path / "one.gguf")["blk.0.ffn_down.weight"]
    x = torch.randn(2, COLUMNS)
    if tensor.mode == "affine":
        scales, biases = tensor.scales.float(), tensor.biases.float()
        emulated = emulate_qmm(lib, x, tensor.weight, scales, biases, tensor.group_size, tensor.bits, True)[0]
        on_cpu = metalq.affine_qmm_t(x, tensor.weight, scales, biases, tensor.group_size, tensor.bits)
    else:
        emulated = emulate_fp_qmm(lib, x, tensor.weight, tensor.scales, tensor.mode, None, True)[0]
        on_cpu = metalq.fp_qmm_t(x, tensor.weight, tensor.scales, tensor.mode)
    torch.testing.assert_close(emulated, on_cpu, rtol=1e-5, atol=1e-5 * on_cpu.abs().max().item())


def test_float_tensors_stay_as_they_are(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "f.gguf"), "llama")
    values = {kind: np.random.default_rng(1).standard_normal((4, 64)).astype(dtype)
              for kind, dtype in (("F32", np.float32), ("F16", np.float16))}
    for kind, array in values.items():
        writer.add_tensor(kind.lower(), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = metalq.read_gguf(tmp_path / "f.gguf")
    for kind, array in values.items():
        tensor = tensors[kind.lower()]
        assert not tensor.quantized and tensor.ggml_type == kind
        assert np.array_equal(tensor.weight.numpy(), array)


def test_unsupported_types_are_named_or_loaded_dequantized_on_request(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    raw = gf.quantized_bytes((rng.standard_normal((8, 256)) * 0.05).astype(np.float32), "Q8_0", rng)
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=T.Q8_0)
    iq = rng.integers(0, 256, (8, 256 // 32 * gguf.GGML_QUANT_SIZES[T.IQ4_NL][1]), dtype=np.uint8)
    iq.reshape(-1, 18)[:, 0:2] = np.full((1,), 0.01, np.float16).view(np.uint8)
    writer.add_tensor("blk.0.attn_k.weight", iq, raw_dtype=T.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_k\.weight' \(IQ4_NL.*no metalq format"):
        metalq.read_gguf(path)
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) of type IQ4_NL .* dequantized to float"):
        tensors = metalq.read_gguf(path, dequantize_unsupported=True)
    assert tensors["blk.0.attn_q.weight"].quantized and not tensors["blk.0.attn_k.weight"].quantized
    assert np.array_equal(tensors["blk.0.attn_k.weight"].weight.numpy(),
                          gguf.quants.dequantize(iq, T.IQ4_NL).reshape(8, 256))


# ---- whole models against transformers' own GGUF loader ----------------------------------------------------------

def q4_k_m(name, shape):
    """llama.cpp's Q4_K_M recipe, in the small: Q6_K for attn_v, ffn_down and the output head, else Q4_K."""
    return "Q6_K" if name.endswith(("attn_v.weight", "ffn_down.weight", "output.weight")) else "Q4_K"


def uniform(kind):
    return lambda name, shape: kind


def load_both(path, **kwargs):
    ours = mt.from_pretrained(path, device="cpu", **kwargs)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    return ours, theirs


def assert_same_model(ours, theirs, written):
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    tokens = ours.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens, theirs.generate(ids[:1], max_new_tokens=8, do_sample=False))
    quantized = [m for m in ours.modules() if isinstance(m, (MetalLinear, MetalEmbedding))]
    assert len(quantized) == sum(kind not in ("F32", "F16") for kind in written.values())


@pytest.mark.parametrize("kind", [*gf.LEGACY, *gf.K_TYPES])
def test_llama_of_every_type_matches_transformers(tmp_path, kind):
    path = tmp_path / f"llama-{kind}.gguf"
    written = gf.write_gguf(path, gf.tiny_model("llama"), uniform(kind))
    ours, theirs = load_both(path)
    assert_same_model(ours, theirs, written)
    layer = ours.model.layers[0].self_attn.q_proj
    assert isinstance(layer, MetalLinear) and (layer.bits, layer.group_size) == (FORMATS[kind].bits,
                                                                                FORMATS[kind].group_size)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_q4_k_m_mix_matches_transformers(tmp_path, model_type):
    path = tmp_path / f"{model_type}-Q4_K_M.gguf"
    written = gf.write_gguf(path, gf.tiny_model(model_type), q4_k_m)
    ours, theirs = load_both(path)
    assert_same_model(ours, theirs, written)
    formats = {(m.bits, m.group_size) for m in ours.modules() if isinstance(m, MetalLinear)}
    assert formats == {(4, 32), (6, 16)}


def test_tied_quantized_embedding_becomes_a_tied_head(tmp_path):
    path = tmp_path / "tied.gguf"
    written = gf.write_gguf(path, gf.tiny_model("llama", tie=True), uniform("Q8_0"))
    assert "output.weight" not in written
    ours, theirs = load_both(path)
    assert isinstance(ours.model.embed_tokens, MetalEmbedding) and isinstance(ours.lm_head, MetalTiedHead)
    assert_same_model(ours, theirs, written)


def test_loading_never_dequantizes(tmp_path, monkeypatch):
    path = tmp_path / "mix.gguf"
    gf.write_gguf(path, gf.tiny_model("llama"), q4_k_m)

    def refuse(*args, **kwargs):
        raise AssertionError("a quantized tensor was dequantized to float while loading")

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    model = metalq.load_gguf(path, device="cpu")
    floats = [name for name, t in model.state_dict().items() if t.is_floating_point() and t.dim() == 2
              and not name.endswith(("scales", "biases", "qbiases"))]
    assert floats == []  # every matrix is packed


def test_tokenizer_and_config_come_from_transformers(tmp_path):
    path = tmp_path / "llama.gguf"
    gf.write_gguf(path, gf.tiny_model("llama"), uniform("Q4_0"))
    model = metalq.load_gguf(path, device="cpu")
    config = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    assert model.config.to_dict() | {"dtype": None} == config.to_dict() | {"dtype": None}
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert tokenizer.convert_tokens_to_ids("<0x41>") == 3 + 0x41


# ---- bad files ---------------------------------------------------------------------------------------------------

def test_bad_files_are_named_errors(tmp_path):
    path = tmp_path / "good.gguf"
    gf.write_gguf(path, gf.tiny_model("llama"), uniform("Q4_K"))
    data = path.read_bytes()
    (tmp_path / "magic.gguf").write_bytes(b"NOPE" + data[4:])
    (tmp_path / "truncated.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"magic\.gguf: not a complete GGUF file .*magic"):
        metalq.load_gguf(tmp_path / "magic.gguf")
    with pytest.raises(ValueError, match=r"truncated\.gguf: not a complete GGUF file"):
        metalq.read_gguf(tmp_path / "truncated.gguf")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        metalq.load_gguf(tmp_path / "missing.gguf")


def test_shape_mismatch_is_named_and_nothing_is_loaded(tmp_path, monkeypatch):
    path = tmp_path / "wide.gguf"
    gf.write_gguf(path, gf.tiny_model("llama", hidden=128), uniform("Q8_0"))
    model = transformers.AutoModelForCausalLM.from_config(gf.tiny_model("llama", hidden=64).config)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight|has shape"):
        metalq.checkpoint.load_gguf_into(model, path)
    assert all(torch.equal(t, before[name]) for name, t in model.state_dict().items())
    assert not any(isinstance(m, MetalLinear) for m in model.modules())


# ---- convert -----------------------------------------------------------------------------------------------------

def test_convert_to_mlx_loads_in_mlx_lm_with_the_same_logits(tmp_path):
    from conftest import require_mlx

    mx = require_mlx()
    import mlx_lm

    path = tmp_path / "llama-Q4_0.gguf"
    gf.write_gguf(path, gf.tiny_model("llama"), uniform("Q4_0"))
    out = metalq.convert_checkpoint(path, tmp_path / "mlx", to="mlx")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    ours = metalq.load_gguf(path, device="cpu")
    model, _ = mlx_lm.load(str(out))
    ids = [[5, 9, 77, 3, 200]]
    with torch.no_grad():
        expected = ours(input_ids=torch.tensor(ids)).logits.numpy()
    theirs = np.array(model(mx.array(ids)).astype(mx.float32))
    np.testing.assert_allclose(theirs, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_convert_of_a_group_size_16_mix_says_what_reads_it(tmp_path):
    path = tmp_path / "mix.gguf"
    gf.write_gguf(path, gf.tiny_model("llama"), q4_k_m)
    with pytest.raises(ValueError, match="group size 16"):
        metalq.convert_checkpoint(path, tmp_path / "out", to="mlx")
    assert not (tmp_path / "out").exists()
