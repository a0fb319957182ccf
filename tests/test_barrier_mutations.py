"""Mutation proof of the emulator's scheduler: every threadgroup_barrier in metal/*.h is needed.

For each barrier a mutant copy of metal/ has that one barrier removed; a small .metal file that
includes the (mutated) headers and instantiates only the kernels of the barrier's check is built
for the emulator (seconds, where the whole quantized.metal takes about a minute), and the check
(the kernel tests' own oracles on one small shape) runs in the forward, reverse and random
SIMD-group orders. The unmutated headers pass every order; each mutant must fail in at least one.
A barrier that no check can prove necessary has to be deleted or documented here, never kept on
faith: CHECKS must cover every barrier of metal/.
"""
import re
import shutil
from pathlib import Path

import pytest
import torch

import emulator
import test_metal_qmm
import test_metal_qmv
from conftest import METAL_DIR, require

BARRIER = re.compile(r"^\s*threadgroup_barrier\(mem_flags::mem_threadgroup\);\s*$")
ORDERS = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2)]
FORMAT = (torch.float16, 64, 4)  # dtype, group size, bits
AFFINE = "metalq::Affine<half, 64, 4>"


def _qmm_check(transpose, N, K):
    def check(lib, order, seed):
        dtype, gs, bits = FORMAT
        x, packed, weights = test_metal_qmm._problem(33, N, K, dtype, gs, bits, transpose, seed=bits)
        out, _, _ = _emulate(test_metal_qmm.emulate, lib, x, packed, gs, bits, transpose, order, seed)
        test_metal_qmm.check_against_oracles(out, x, packed, weights, gs, bits, transpose)
    return check


def _qmv_check(M, K, N):
    def check(lib, order, seed):
        dtype, gs, bits = FORMAT
        x, wq, scales, biases = test_metal_qmv._operands(M, K, N, dtype, gs, bits, True, seed=K + N)
        got, _, _ = _emulate(test_metal_qmv.emulate_qmm, lib, x, wq, scales, biases, gs, bits, True, order, seed)
        exact, magnitude = test_metal_qmv.reference(x, wq, scales, biases, gs, bits, True)
        assert torch.all((got.double() - exact).abs() <= test_metal_qmv.TOLERANCE[dtype] * magnitude + 1e-30)
    return check


def _emulate(emulate, lib, *args):
    *args, order, seed = args
    return emulate(_Seeded(lib, seed), *args, order)


class _Seeded:
    """lib.run with a fixed seed for the random order."""

    def __init__(self, lib, seed):
        self._lib, self._seed = lib, seed

    def run(self, plan, order="forward"):
        return self._lib.run(plan, order, self._seed)


# header -> (kernels to instantiate, {name: check}). Every header of metal/ with a barrier needs one.
CHECKS = {
    # M = 33 and ragged N: a partial tile row and column; K = 128 / 100: four K steps of kQmmBK = 32
    # (the last one partial for qmm_n), so the K loop's barriers matter.
    "qmm.h": ([("affine_qmm_t_half_gs_64_b_4", f"qmm, {AFFINE}, true"),
               ("affine_qmm_n_half_gs_64_b_4", f"qmm, {AFFINE}, false")],
              {"qmm_t": _qmm_check(True, 72, 128), "qmm_n": _qmm_check(False, 64, 100)}),
    # qmv_fast (two K blocks) and qmv (ragged N): both reduce partial sums across simdgroups.
    "qmv.h": ([("affine_qmv_fast_half_gs_64_b_4", f"qmv_fast, {AFFINE}"),
               ("affine_qmv_half_gs_64_b_4", f"qmv, {AFFINE}")],
              {"qmv_fast": _qmv_check(1, 2 * test_metal_qmv._fast_block(4), 16), "qmv": _qmv_check(1, 3 * 64, 13)}),
}


def barriers():
    """(header, 1-based line) of every threadgroup barrier in metal/*.h."""
    found = []
    for header in sorted(METAL_DIR.glob("*.h")):
        for number, text in enumerate(header.read_text().splitlines(), 1):
            if "threadgroup_barrier" in text:
                assert BARRIER.match(text), f"{header.name}:{number}: unexpected barrier form {text.strip()!r}"
                found.append((header.name, number))
    return found


def _library(tmp_path: Path, header: str, removed_line: int | None) -> emulator.Library:
    """The kernels of CHECKS[header] built from a copy of metal/ without the barrier at removed_line."""
    tree = tmp_path / "metal"
    shutil.copytree(METAL_DIR, tree, ignore=shutil.ignore_patterns("*.metal"))
    if removed_line is not None:
        path = tree / header
        lines = path.read_text().splitlines(keepends=True)
        assert BARRIER.match(lines[removed_line - 1])
        lines[removed_line - 1] = "    // threadgroup barrier removed (mutant)\n"
        path.write_text("".join(lines))
    kernels, _ = CHECKS[header]
    source = tree / "mutant.metal"
    source.write_text(
        '#include "quantized.h"\n#include "fp_quantized.h"\n#include "qmv.h"\n#include "qmm.h"\n'
        "#define instantiate_kernel(name, func, ...) \\\n"
        "  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;\n"
        + "".join(f'instantiate_kernel("{name}", {args})\n' for name, args in kernels)
        + 'instantiate_kernel("split_k_reduce_half", split_k_reduce, half)\n')
    return emulator.Library(emulator.build(source, (str(tree),)))


def _failing_orders(lib, checks):
    """["check@order", ...] of the checks failing in each order."""
    failing = []
    for name, check in checks.items():
        for order, seed in ORDERS:
            try:
                check(lib, order, seed)
            except (AssertionError, emulator.EmulatorError):
                failing.append(f"{name}@{order}" + (f"/{seed}" if order == "random" else ""))
    return failing


def test_every_barrier_has_a_check():
    assert {header for header, _ in barriers()} <= set(CHECKS)


@pytest.mark.slow
@pytest.mark.parametrize("header", sorted(CHECKS))
def test_checks_pass_without_mutation(tmp_path, header):
    require(emulator.available(), f"{emulator.CLANG} (apt-get install clang-19)")
    assert _failing_orders(_library(tmp_path, header, None), CHECKS[header][1]) == []


@pytest.mark.slow
@pytest.mark.parametrize("header, line", barriers(), ids=[f"{h}:{n}" for h, n in barriers()])
def test_removing_a_barrier_fails_a_check(tmp_path, header, line):
    require(emulator.available(), f"{emulator.CLANG} (apt-get install clang-19)")
    failing = _failing_orders(_library(tmp_path, header, line), CHECKS[header][1])
    print(f"{header}:{line} removed: fails in {failing}")
    assert failing, f"removing the barrier at metal/{header}:{line} passes every check in every order"
