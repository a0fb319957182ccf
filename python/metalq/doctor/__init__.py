"""``python -m metalq doctor``: the environment, and every op checked on every device, in one report.

What a user runs first and pastes into a bug report. It prints the versions and build facts that
matter (metalq, torch and the torch metalq was built against, the CPU kernel ISA, threads, the
platform, on macOS the GPU and the kind of Metal library), then runs each op over a small grid of
formats and dtypes on ``cpu`` and, when available, ``mps``, one table row per case:

* against a float64 reference computed with plain torch from the packed words (unpacked by
  metalq.reference, the value codes decoded here: independent of metalq's kernels); matmuls within a dtype-scaled
  tolerance of ``|x| @ |W|``, dequantize within two roundings to the dtype, and quantize by its
  round trip: ``dequantize(quantize(w))`` within the scale step of ``w``;
* on a device other than the CPU also against the CPU op: bit-exact for pack, unpack, quantize and
  dequantize, within twice the matmul tolerance for the matmuls.

``--emulator`` adds the rows of the MPS plans (``metalq._C.plan_*``) run on the Metal emulator of a
source checkout (``tests/emulator``, which needs clang-19): the Mac's kernels, checked on any machine.

Exit status: 0 when every row passes, 1 when one mismatches or raises, 2 for a bad command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

from .backends import BuildFailed, TorchBackend, Unavailable, load_emulator
from .checks import GRIDS, Row, cases, run_case
from .environment import environment, mps_state

DESCRIPTION = """\
Print the environment (versions, build, CPU kernels, threads, GPU) and check every metalq op on every
available device (cpu, and mps when available): pack, unpack, affine_quantize, affine_dequantize,
affine_qmm_t and affine_qmm_n at several M, affine_gather_qmm, and fp_quantize, fp_dequantize, fp_qmm_t,
fp_qmm_n for mxfp4, nvfp4 (with and without a global scale) and mxfp8, over a grid of bits, group sizes
and dtypes.

Each row is checked against a float64 reference computed with plain torch (matmuls within a tolerance
scaled by |x| @ |W|, dequantize within two roundings, quantize by its round trip within a scale step),
and on mps also against the CPU op (bit-exact except the matmuls). err and tol are in the same units;
err <= tol passes. Exit status 0 when every row passes, 1 otherwise, 2 on bad usage. Paste the whole
output into a bug report.
"""

EPILOG = """\
examples:
  python -m metalq doctor                  the default grid on every available device
  python -m metalq doctor --quick          fewer cases (seconds)
  python -m metalq doctor --device cpu --json > doctor.json
  METALQ_EMULATOR_PATH=~/src/metalq python -m metalq doctor --emulator --quick
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="grid", action="store_const", const="quick",
                      help=f"fewer cases ({GRIDS['quick'].describe()})")
    size.add_argument("--full", dest="grid", action="store_const", const="full",
                      help=f"more cases ({GRIDS['full'].describe()})")
    parser.set_defaults(grid="default")
    parser.add_argument("--device", choices=("cpu", "mps"), action="append", default=None,
                        help="check only this device (repeatable; default: cpu, and mps when available)")
    parser.add_argument("--emulator", action="store_true",
                        help="also run the MPS dispatch plans on the Metal emulator of a source checkout "
                             "(tests/emulator, found via METALQ_EMULATOR_PATH; needs clang-19)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")


def _usage_error(message: str) -> int:
    print(f"metalq doctor: error: {message}", file=sys.stderr)
    return 2


COLUMNS = (("op", 17), ("device", 8), ("dtype", 8), ("format", 12), ("M", 4), ("status", 8), ("err", 9),
           ("tol", 8), ("ms", 8))


def _format_row(row: Row) -> str:
    number = lambda v: "-" if v is None else f"{v:.2e}"  # noqa: E731
    cells = (row.op, row.device, row.dtype, row.format, "-" if row.M is None else str(row.M), row.status,
             number(row.err), number(row.tol), f"{row.ms:.1f}")
    line = " ".join(f"{cell:<{width}}" for cell, (_, width) in zip(cells, COLUMNS))
    return (line + " " + row.message).rstrip()


def run(args: argparse.Namespace) -> int:
    mps_available, mps = mps_state()
    if args.device and "mps" in args.device and not mps_available:
        return _usage_error(f"--device mps: MPS is {mps}")
    devices = list(dict.fromkeys(args.device)) if args.device else ["cpu"] + (["mps"] if mps_available else [])
    grid = GRIDS[args.grid]
    info = environment(mps)
    backends = [TorchBackend(d) for d in devices]
    if args.emulator:
        try:
            emulated, where = load_emulator()
        except Unavailable as error:
            return _usage_error(str(error))
        except BuildFailed as error:
            print(f"metalq doctor: {error}", file=sys.stderr)
            return 1
        backends.append(emulated)
        info.append(("emulator", where))
    cpu = TorchBackend("cpu")
    todo = [(backend, [c for c in cases(grid) if backend.ops is None or c.op in backend.ops]) for backend in backends]
    counts = ", ".join(f"{len(checks)} on {backend.name}" for backend, checks in todo)
    info.append(("checks", f"{counts}; grid {grid.describe()}"))

    out = sys.stdout
    if not args.json:
        print("metalq doctor", file=out)
        width = max(len(key) for key, _ in info)
        for key, value in info:
            print(f"  {key:<{width}}  {value}", file=out)
        print(file=out)
        print(" ".join(f"{name:<{w}}" for name, w in COLUMNS) + " message", file=out)
        out.flush()

    start = time.perf_counter()
    rows = []
    for backend, checks in todo:
        for case in checks:
            row = run_case(case, backend, cpu)
            rows.append(row)
            if not args.json:
                print(_format_row(row), file=out, flush=True)
    seconds = time.perf_counter() - start
    failed = [row for row in rows if row.status != "ok"]
    summary = f"{len(rows) - len(failed)} passed, {len(failed)} failed"
    if args.json:
        json.dump({"environment": dict(info), "rows": [dataclasses.asdict(r) for r in rows],
                   "passed": len(rows) - len(failed), "failed": len(failed), "seconds": round(seconds, 3)},
                  out, indent=1)
        print(file=out)
    else:
        if failed:
            print("\nfailed rows:", file=out)
            for row in failed:
                print(_format_row(row), file=out)
        print(f"\n{summary} ({seconds:.1f} s)", file=out)
    return 1 if failed else 0
