"""What does loading a GGUF file cost with metalq (kept quantized) against transformers' own GGUF loader
(dequantized to float)?

A Llama-shaped model with random weights is written as a Q4_K_M-style GGUF file (llama.cpp's recipe in the small:
Q6_K for ``attn_v``, ``ffn_down`` and the output head, Q4_K elsewhere; the K blocks are valid random ones, as
gguf-py cannot quantize K types), or ``--gguf`` names a real file. Both loaders read it in this process, in
alternating rounds:

- ``load s``: the median wall time of a load (config, tensors, model ready on CPU);
- ``peak MB``: how far the resident set rose during a load (``_memory.peak_growth``): what loading the file needs,
  including the pages of the memory-mapped file both loaders read from (file-backed, so the kernel can drop them);
- ``model MB``: bytes of the loaded model's parameters and buffers;
- ``max |dlogits|``: the largest difference between the two models' logits on the same tokens, relative to the
  largest logit; ``tokens``: whether 16 greedy tokens agree.

Example:
    python benchmarks/bench_gguf.py --hidden 1024 --layers 8
    python benchmarks/bench_gguf.py --gguf Llama-3.2-1B-Instruct-Q4_K_M.gguf
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import metalq
from _memory import peak_growth, release_freed_memory
from _timing import header_lines

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' GGUF writer

MB = 1 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, help="a GGUF file to load (default: write a synthetic Q4_K_M-style one)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of the synthetic model (a multiple of 256)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--rounds", type=int, default=2, help="loads per loader (alternating)")
    return p.parse_args(argv)


def synthetic_gguf(folder: Path, args) -> Path:
    import transformers
    from gguf_files import write_gguf

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4 // 256 * 256,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 256,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )
    with torch.device("meta"):
        shell = transformers.LlamaForCausalLM(config)
    model = shell.to_empty(device="cpu")  # the writer draws K blocks at random and quantizes the rest
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    path = folder / "synthetic-Q4_K_M.gguf"
    write_gguf(path, model, lambda name, shape: "Q6_K" if name.endswith(
        ("attn_v.weight", "ffn_down.weight", "output.weight")) else "Q4_K")
    return path


def model_bytes(model) -> int:
    return sum(t.nbytes for t in (*model.parameters(), *model.buffers()))


def main(argv=None):
    args = parse_args(argv)
    import transformers

    release_freed_memory()
    for line in header_lines("GGUF load: metalq (quantized) vs transformers (dequantized to float32)"):
        print(line)
    with tempfile.TemporaryDirectory() as folder:
        path = args.gguf or synthetic_gguf(Path(folder), args)
        loaders = {
            "metalq.load_gguf": lambda: metalq.load_gguf(path, device="cpu"),
            "transformers": lambda: transformers.AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32).eval(),
        }
        times = {name: [] for name in loaders}
        peaks = {name: [] for name in loaders}
        models = {}
        for _ in range(args.rounds):
            for name, load in loaders.items():
                models.pop(name, None)  # free the previous round's model first
                start = time.perf_counter()
                model, peak = peak_growth(load)
                times[name].append(time.perf_counter() - start)
                peaks[name].append(peak)
                models[name] = model
        ids = torch.randint(0, models["transformers"].config.vocab_size, (1, 32),
                            generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = {name: model(input_ids=ids).logits for name, model in models.items()}
            tokens = {name: model.generate(ids, max_new_tokens=16, do_sample=False) for name, model in models.items()}
        expected = logits["transformers"]
        print(f"# file        {path.name}: {path.stat().st_size / MB:.1f} MB")
        print(f"{'loader':<20}{'load s':>9}{'peak MB':>10}{'model MB':>10}{'max |dlogits|':>15}{'tokens':>8}")
        for name, model in models.items():
            difference = ((logits[name] - expected).abs().max() / expected.abs().max()).item()
            same = torch.equal(tokens[name], tokens["transformers"])
            print(f"{name:<20}{statistics.median(times[name]):>9.2f}{statistics.median(peaks[name]) / MB:>10.1f}"
                  f"{model_bytes(model) / MB:>10.1f}{difference:>15.2e}{'same' if same else 'differ':>8}")


if __name__ == "__main__":
    main()
