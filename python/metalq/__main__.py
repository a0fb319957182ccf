"""``python -m metalq``: command-line tools. ``convert`` rewrites checkpoint directories, ``doctor`` reports the
environment and checks every op on every device (see ``--help``)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import doctor
from .calibration import DATA_METHODS, METHODS
from .config import DEFAULT_BITS, DEFAULT_GROUP_SIZE, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, SUPPORTED_MODES

_CONVERT_HELP = """\
Convert a checkpoint directory, streaming one tensor at a time:

  float Hugging Face model    -> Metal-quantized (transformers' MetalConfig layout; --to mlx for mlx-lm's)
  mlx-lm quantized directory  -> Metal-quantized (the offsets renamed biases -> qbiases)
  Metal-quantized directory   -> mlx-lm directory that mlx_lm.load reads
  GGUF file (llama.cpp)       -> mlx-lm directory (--to metal for a file of one format), tokenizer included;
                                 group size 16 (Q6_K, Q3_K, Q2_K) fits only the Metal layout

The kind of SOURCE is read from its config.json (or its .gguf suffix). The output directory is written under a temporary name
and renamed at the end: an error or Ctrl-C leaves nothing behind. A Metal directory holds one bits/group
size for every layer: mixed-width mlx-lm checkpoints (mlx_lm.convert --quant-predicate) need --to mlx.
Metal output that transformers' own loader cannot read (bits 1, 3, 5, 6, a floating-point mode, quantized
embeddings) is written with a warning: metalq.transformers.from_pretrained loads it.

examples:
  python -m metalq convert ./Llama-3.2-1B ./Llama-3.2-1B-metal-4bit --bits 4 --group-size 64 --skip lm_head
  python -m metalq convert ./Llama-3.2-1B-Instruct-4bit ./llama-metal          (an mlx-community download)
  python -m metalq convert ./llama-metal ./llama-mlx --to mlx
  python -m metalq convert ./Llama-3.2-1B-Instruct-Q4_0.gguf ./llama-mlx     (GGUF: the packed blocks, unchanged)
  python -m metalq convert ./Qwen3-0.6B ./qwen-gptq --to mlx --method gptq --calibration data.txt --bpw 4.5
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m metalq", description="metalq command-line tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    convert = commands.add_parser(
        "convert",
        help="convert a float, Metal or mlx-lm checkpoint directory, or a GGUF file",
        description=_CONVERT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    convert.add_argument("source", metavar="SOURCE",
                         help="input directory (config.json + safetensors), or a .gguf file")
    convert.add_argument("destination", metavar="DEST", help="output directory (must not exist, see --overwrite)")
    convert.add_argument("--to", choices=("metal", "mlx"), default=None,
                         help="output spelling (default: metal; mlx for a Metal-quantized source or a GGUF file)")
    convert.add_argument("--bits", type=int, default=None, choices=SUPPORTED_BITS,
                         help=f"bits per weight for a float source (default {DEFAULT_BITS})")
    convert.add_argument("--group-size", type=int, default=None, choices=SUPPORTED_GROUP_SIZES,
                         help=f"weights per scale/bias pair for a float source (default {DEFAULT_GROUP_SIZE})")
    convert.add_argument("--mode", choices=SUPPORTED_MODES, default=None,
                         help="MLX quantization mode for a float source (default affine; mxfp4, nvfp4 and mxfp8 "
                              "fix bits and group size)")
    skips = convert.add_mutually_exclusive_group()
    skips.add_argument("--skip", action="append", default=None, metavar="PATTERN",
                       help="keep matching modules in float: a full name, a prefix ending at a module boundary "
                            "or a suffix such as lm_head (repeatable; exactly these). Default: the output head for "
                            "--to metal, as transformers' MetalConfig; nothing for --to mlx, as mlx_lm.convert")
    skips.add_argument("--no-skip", action="store_const", const=[], dest="skip",
                       help="keep nothing in float: quantize the output head too (an empty --skip list)")
    convert.add_argument("--method", choices=METHODS, default=None,
                         help="how a float source's codes are chosen (metalq.calibrate); all but rtn (the default, "
                              "streamed) load the model in memory. clip works without data; awq, gptq and dwq "
                              "need --calibration")
    convert.add_argument("--calibration", metavar="FILE",
                         help="calibration text for --method / --bpw: one sample per non-empty line")
    convert.add_argument("--bpw", type=float, default=None,
                         help="mixed precision: per-layer bits and group sizes averaging this many bits per weight "
                              "(scales and biases included); needs --calibration and --to mlx")
    convert.add_argument("--embeddings", action="store_true",
                         help="also quantize nn.Embedding tables (as mlx-lm does)")
    convert.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                         help="split the safetensors files above this size, e.g. 2GB (default 5GB)")
    convert.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
    convert.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    doctor_parser = commands.add_parser(
        "doctor",
        help="print the environment and check every op on every device (for bug reports)",
        description=doctor.DESCRIPTION,
        epilog=doctor.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    doctor.add_arguments(doctor_parser)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        try:
            return doctor.run(args)
        except KeyboardInterrupt:
            print("metalq doctor: interrupted", file=sys.stderr)
            return 130
    from .checkpoint import convert_checkpoint  # after parsing: --help needs no torch import

    try:
        out = _convert_calibrated(args) if args.method not in (None, "rtn") or args.bpw is not None else convert_checkpoint(
            args.source,
            args.destination,
            to=args.to,
            bits=args.bits,
            group_size=args.group_size,
            mode=args.mode,
            skip=args.skip,
            embeddings=args.embeddings,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print("metalq convert: interrupted; no output was written", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as error:
        print(f"metalq convert: error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def _convert_calibrated(args):
    from .calibration.convert import convert_calibrated

    if args.mode not in (None, "affine"):
        raise ValueError(f"--method chooses affine codes; --mode {args.mode} cannot be calibrated")
    if args.calibration is None and (args.method in DATA_METHODS or args.bpw is not None):
        raise ValueError(f"--method {'/'.join(DATA_METHODS)} and --bpw learn from data: pass --calibration FILE")
    return convert_calibrated(args.source, args.destination, method=args.method or "rtn",
                              calibration=args.calibration, to=args.to or "metal", bits=args.bits,
                              group_size=args.group_size, bpw=args.bpw, skip=args.skip, embeddings=args.embeddings,
                              max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                              progress=not args.no_progress)


if __name__ == "__main__":
    sys.exit(main())
