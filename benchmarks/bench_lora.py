"""What does a LoRA training step cost on a metalq 4-bit base against the same model in float (plain PEFT)?

One Llama-shaped model (random weights; the shapes are what matters) is built once. Its float copy gets PEFT's
LoRA on every linear layer but the head; a quantized copy (``metalq.quantize_``, every linear layer but the
head) gets the same adapter through ``metalq.peft.get_peft_model``. Each variant runs the same training step
(forward, loss, backward, AdamW step on the LoRA factors), timed in alternating rounds (``_timing.measure``),
optionally under ``torch.autocast`` in bfloat16.

Memory, read from the kernel's own counters in this process (Linux ``/proc/self/status``):

- ``model MB``: bytes of the model's parameters and buffers (the frozen base, quantized or not, plus the head
  and embeddings, plus the adapter);
- ``step peak MB``: how far the resident set rose above its level before a step, during that step
  (``_memory.peak_growth``; the median of three readings after a warm-up step): activations, gradients,
  temporaries;
- ``largest layer MB``: one float weight of the biggest adapted layer. On a quantized base the step peak
  should not depend on it: the base is never dequantized, gradients reach the activations through
  ``affine_qmm_n``.

Example:
    python benchmarks/bench_lora.py --hidden 1024 --layers 4 --seq 128 --batch 2
    python benchmarks/bench_lora.py --autocast            # bfloat16 autocast for both
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch

import metalq
import metalq.peft
from _memory import peak_growth, release_freed_memory
from _timing import header_lines, measure

MB = 1 << 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, help="MLP width (default 2.75 x hidden, as Llama)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--autocast", action="store_true", help="run the steps under torch.autocast(bfloat16)")
    p.add_argument("--budget", type=float, default=5.0, help="seconds of timed steps per variant")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    return p.parse_args(argv)


def build_model(args):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        intermediate_size=args.intermediate or (args.hidden * 11 // 4) // 64 * 64,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=max(args.seq, 128), tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def model_bytes(model) -> int:
    return sum(t.nbytes for t in (*model.parameters(), *model.buffers()))


def training_step(model, ids, autocast):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def main(argv=None):
    args = parse_args(argv)
    import peft

    if args.threads:
        torch.set_num_threads(args.threads)
    release_freed_memory()
    for line in header_lines("LoRA training step: float base (PEFT) vs metalq quantized base (metalq.peft)"):
        print(line)
    float_model = build_model(args)
    quantized = copy.deepcopy(float_model)
    metalq.quantize_(quantized, metalq.MetalConfig(bits=args.bits, group_size=args.group_size),
                     filter_fn=lambda module, fqn: fqn != "lm_head")

    def lora():
        return peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")

    variants = {
        "float base": peft.get_peft_model(float_model, lora()),
        f"metalq {args.bits}-bit gs{args.group_size}": metalq.peft.get_peft_model(quantized, lora()),
    }
    for model in variants.values():
        model.train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    steps = {name: training_step(model, ids, args.autocast) for name, model in variants.items()}
    for step in steps.values():
        step()  # warm-up: the optimizer state and one-time buffers exist from now on
    # three interleaved readings each, the median
    readings = {name: [] for name in steps}
    for _ in range(3):
        for name, step in steps.items():
            readings[name].append(peak_growth(step)[1])
    peaks = {name: statistics.median(values) for name, values in readings.items()}
    timings = measure(steps, reps=20, warmup=1, budget_s=args.budget, min_reps=3, slow_s=30.0)
    largest = max(m.in_features * m.out_features for m in float_model.modules() if isinstance(m, torch.nn.Linear)
                  and m is not float_model.lm_head) * 4

    print(f"# model       hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; batch {args.batch} x "
          f"{args.seq} tokens; LoRA r={args.rank} on every linear but the head"
          f"{'; autocast bfloat16' if args.autocast else ''}")
    print(f"# largest adapted layer: {largest / MB:.1f} MB as a float32 weight")
    print(f"{'base':<22}{'model MB':>10}{'step peak MB':>14}{'ms/step':>10}{'steps':>7}{'time ratio':>12}")
    reference = timings["float base"].median_ms
    for name, model in variants.items():
        timing = timings[name]
        print(f"{name:<22}{model_bytes(model) / MB:>10.1f}{peaks[name] / MB:>14.1f}{timing.median_ms:>10.1f}"
              f"{timing.samples:>7}{timing.median_ms / reference:>12.2f}")


if __name__ == "__main__":
    main()
