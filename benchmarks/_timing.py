"""Shared helpers for the benchmark scripts: interleaved median timing and the environment header.

Timing follows MLX's ``time_fn`` (warm up, then time many calls) with two changes for a shared,
noisy CPU: the number of calls adapts to a per-op time budget, and the ops of one configuration
are timed in alternating rounds, so that a load spike from another process hits all of them
instead of biasing one ratio.
"""
from __future__ import annotations

import datetime
import glob
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch


@dataclass
class Timing:
    median_ms: float
    samples: int
    cpu_util: float  # process CPU time / wall time over the timed calls: about the threads kept busy

    @property
    def few(self) -> bool:
        """True when too few calls fitted in the budget for the median to mean much."""
        return self.samples < 3


def timed_call(fn: Callable[[], object]) -> tuple[object, float, float]:
    """(result, wall seconds, process CPU seconds) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    t1, c1 = time.perf_counter(), time.process_time()
    return out, t1 - t0, c1 - c0


def measure(
    fns: Dict[str, Callable[[], object]],
    reps: int = 100,
    warmup: int = 5,
    budget_s: float = 0.5,
    min_reps: int = 5,
    rounds: int = 3,
    slow_s: float = 2.0,
    clock: str = "wall",
    first: Optional[Dict[str, Tuple[float, float]]] = None,
) -> Dict[str, Timing]:
    """Median time of each synchronous ``fn`` (each call must finish its work before returning).

    Each op gets ``clamp(budget_s / first_call, min_reps, reps)`` timed calls, split over ``rounds``
    rounds that alternate between the ops; every round starts with untimed warm-up calls (``warmup``
    in the first round, one afterwards) so each op is timed with its own data in cache. An op whose
    first call takes longer than ``slow_s`` is timed by that single call (``Timing.few``).

    ``clock="wall"`` reports wall time; ``clock="cpu"`` reports process CPU time, which on a machine
    shared with other jobs stays close to the uncontended cost of single-threaded ops (but counts
    every busy thread, including spin-waits, for multi-threaded ones). ``first`` passes (wall, cpu)
    of a call already made, e.g. a correctness check, to stand in for the first call.
    """
    first = dict(first or {})
    for name, fn in fns.items():
        if name not in first:
            first[name] = timed_call(fn)[1:]
    walls: Dict[str, List[float]] = {name: [] for name in fns}
    cpus: Dict[str, List[float]] = {name: [] for name in fns}
    plan: Dict[str, int] = {}
    for name, (wall, cpu) in first.items():
        if wall >= slow_s:
            walls[name].append(wall)
            cpus[name].append(cpu)
            plan[name] = 0
        else:
            plan[name] = max(min_reps, min(reps, int(budget_s / max(wall, 1e-9))))
    for r in range(rounds):
        for name, fn in fns.items():
            todo = plan[name] // rounds + (1 if r < plan[name] % rounds else 0)
            if todo == 0:
                continue
            for _ in range(min(warmup if r == 0 else 1, todo)):
                fn()
            for _ in range(todo):
                _, wall, cpu = timed_call(fn)
                walls[name].append(wall)
                cpus[name].append(cpu)
    picked = walls if clock == "wall" else cpus
    return {
        name: Timing(
            median_ms=1e3 * statistics.median(picked[name]),
            samples=len(walls[name]),
            cpu_util=sum(cpus[name]) / max(sum(walls[name]), 1e-12),
        )
        for name in fns
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _llc_bytes() -> Optional[int]:
    """Size of cpu0's last-level cache from sysfs (Linux), or None."""
    sizes = {}
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(f"{index}/level") as f:
                level = int(f.read())
            with open(f"{index}/size") as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes[level] = int(text.rstrip("KMG")) * unit
    return sizes[max(sizes)] if sizes else None


def _l3_size() -> str:
    llc = _llc_bytes()
    return f"{llc // 2**20} MiB" if llc else "?"


def stream_read_bandwidth(clock: str = "wall", min_bytes: int = 2**29, reps: int = 7) -> float:
    """Bytes per second of a streaming read (``torch.sum`` on torch's intra-op threads) of a float32 buffer
    twice the size of the last-level cache (at least ``min_bytes``): the DRAM rate that bounds any op
    whose operands come from memory. Median of ``reps`` reads on ``clock`` (as ``measure``), after one
    read that faults the pages in."""
    nbytes = max(min_bytes, 2 * (_llc_bytes() or 0))
    buf = torch.ones(nbytes // 4)
    buf.sum()
    seconds = [timed_call(buf.sum)[1 if clock == "wall" else 2] for _ in range(reps)]
    del buf
    return nbytes / statistics.median(seconds)


def metalq_isa() -> str:
    """The CPU kernel variant metalq runs (METALQ_CPU_ISA overrides the choice by CPU features)."""
    import metalq

    return metalq._C.cpu_kernel_isa()


def header_lines(title: str) -> List[str]:
    try:
        import mlx.core as mx

        mlx_version = mx.__version__
    except ImportError:
        mlx_version = "not installed"
    return [
        f"# {title}",
        f"# date        {datetime.date.today().isoformat()}",
        f"# device      cpu: {_cpu_model()}, {os.cpu_count()} logical cores, L3 {_l3_size()}",
        f"# software    python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), mlx {mlx_version}",
        f"# metalq ISA  {metalq_isa()}",
    ]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Normwise error allowed against a float32 oracle: bf16/fp16 outputs are rounded to 8/11 bits.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def add_common_arguments(p, budget: float) -> None:
    """The options every benchmark script shares: formats, timing, threads, MLX, output."""
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    p.add_argument("--reps", type=int, default=100, help="most timed calls per op")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before the first timed round")
    p.add_argument("--budget", type=float, default=budget,
                   help="seconds of timed calls per op and config (at least 5 calls; ops slower than 2 s get 1)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time, steadier on a shared machine (use with --threads 1)")
    p.add_argument("--no-mlx", action="store_true", help="skip the MLX baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", metavar="PATH", help="also write every row, with sample counts, to PATH")


def start_run(args, title: str, mx) -> bool:
    """Applies --threads, puts MLX (module or None) on its CPU, prints the header; True if MLX is compared."""
    if args.threads:
        torch.set_num_threads(args.threads)
    use_mlx = mx is not None and not args.no_mlx
    if use_mlx:
        mx.set_default_device(mx.cpu)
    for line in header_lines(title):
        print(line)
    return use_mlx
