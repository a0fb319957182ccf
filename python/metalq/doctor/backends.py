"""Where ``python -m metalq doctor`` runs an op: TorchBackend (metalq.ops on a torch device) and
EmulatorBackend (the MPS plans on the Metal emulator of a source checkout), and the emulator's lookup."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch

import metalq
from .. import ops
from .checks import first_line


class TorchBackend:
    """The ops through metalq.ops (so through torch's dispatcher) on a torch device; results on the CPU."""

    ops = None  # every op

    def __init__(self, device: str):
        self.name = device
        self.device = torch.device(device)

    def _to(self, *tensors):
        return [None if t is None else t.to(self.device) for t in tensors]

    def _back(self, result):
        if isinstance(result, tuple):
            return tuple(t.cpu() for t in result)
        return result.cpu()

    def pack(self, codes, bits):
        return self._back(ops.pack(*self._to(codes), bits))

    def unpack(self, wq, bits):
        return self._back(ops.unpack(*self._to(wq), bits))

    def affine_quantize(self, w, group_size, bits):
        return self._back(ops.affine_quantize(*self._to(w), group_size, bits))

    def affine_dequantize(self, wq, scales, biases, group_size, bits):
        return self._back(ops.affine_dequantize(*self._to(wq, scales, biases), group_size, bits))

    def affine_qmm(self, x, wq, scales, biases, group_size, bits, transpose):
        op = ops.affine_qmm_t if transpose else ops.affine_qmm_n
        return self._back(op(*self._to(x, wq, scales, biases), group_size, bits))

    def affine_gather_qmm(self, x, wq, scales, biases, rhs, group_size, bits):
        x, wq, scales, biases, rhs = self._to(x, wq, scales, biases, rhs)
        return self._back(ops.affine_gather_qmm(x, wq, scales, biases, rhs_indices=rhs, transpose=True,
                                                group_size=group_size, bits=bits))

    def fp_quantize(self, w, mode, global_scale):
        w, global_scale = self._to(w, global_scale)
        return self._back(ops.fp_quantize(w, mode, global_scale))

    def fp_dequantize(self, wq, scales, mode, global_scale, dtype):
        wq, scales, global_scale = self._to(wq, scales, global_scale)
        return self._back(ops.fp_dequantize(wq, scales, mode, global_scale, dtype))

    def fp_qmm(self, x, wq, scales, mode, global_scale, transpose):
        op = ops.fp_qmm_t if transpose else ops.fp_qmm_n
        x, wq, scales, global_scale = self._to(x, wq, scales, global_scale)
        return self._back(op(x, wq, scales, mode, global_scale))


def _meta(t):
    return None if t is None else t.to("meta")


def _poisoned(meta: torch.Tensor) -> torch.Tensor:
    """A CPU tensor shaped like `meta`, every byte 0xFF (NaN, or all-ones words): unwritten values show."""
    out = torch.empty(meta.shape, dtype=meta.dtype)
    out.view(torch.uint8).fill_(0xFF)
    return out


class EmulatorBackend:
    """The MPS dispatch plans (metalq._C.plan_*) run on the Metal emulator, on poisoned CPU outputs."""

    name = "emulator"
    ops = {"pack", "unpack", "affine_quantize", "affine_dequantize", "affine_qmm_t", "affine_qmm_n",
           "affine_gather_qmm", "fp_quantize", "fp_dequantize", "fp_qmm_t", "fp_qmm_n"}  # with a metalq._C.plan_*

    def __init__(self, library):
        self.library = library

    def _run(self, plans):
        for plan in plans if isinstance(plans, list) else [plans]:
            self.library.run(plan)

    def pack(self, codes, bits):
        out = _poisoned(torch.ops.metalq.pack(_meta(codes), bits))
        self._run(metalq._C.plan_pack(codes.contiguous(), out, bits))
        return out

    def unpack(self, wq, bits):
        out = _poisoned(torch.ops.metalq.unpack(_meta(wq), bits))
        self._run(metalq._C.plan_unpack(wq.contiguous(), out, bits))
        return out

    def affine_quantize(self, w, group_size, bits):
        outs = [_poisoned(t) for t in torch.ops.metalq.affine_quantize(_meta(w), group_size, bits)]
        self._run(metalq._C.plan_affine_quantize(w.contiguous(), *outs, group_size, bits))
        return tuple(outs)

    def affine_dequantize(self, wq, scales, biases, group_size, bits):
        out = _poisoned(torch.ops.metalq.affine_dequantize(*map(_meta, (wq, scales, biases)), group_size, bits))
        self._run(metalq._C.plan_affine_dequantize(wq, scales, biases, out, group_size, bits))
        return out

    def affine_qmm(self, x, wq, scales, biases, group_size, bits, transpose):
        op = torch.ops.metalq.affine_qmm_t if transpose else torch.ops.metalq.affine_qmm_n
        out = _poisoned(op(*map(_meta, (x, wq, scales, biases)), group_size, bits))
        self._run(metalq._C.plan_affine_qmm(x, wq, scales, biases, out, group_size, bits, transpose))
        return out

    def affine_gather_qmm(self, x, wq, scales, biases, rhs, group_size, bits):
        meta = torch.ops.metalq.affine_gather_qmm(*map(_meta, (x, wq, scales, biases)), None, _meta(rhs), True,
                                                  group_size, bits, False)
        out = _poisoned(meta)
        self._run(metalq._C.plan_affine_gather_qmm(x, wq, scales, biases, None, rhs, out, True, group_size, bits,
                                                   False))
        return out

    def fp_quantize(self, w, mode, global_scale):
        outs = [_poisoned(t) for t in torch.ops.metalq.fp_quantize(_meta(w), mode, _meta(global_scale))]
        self._run(metalq._C.plan_fp_quantize(w.contiguous(), *outs, mode, global_scale))
        return tuple(outs)

    def fp_dequantize(self, wq, scales, mode, global_scale, dtype):
        out = _poisoned(torch.ops.metalq.fp_dequantize(_meta(wq), _meta(scales), mode, _meta(global_scale), dtype))
        self._run(metalq._C.plan_fp_dequantize(wq, scales, out, mode, global_scale))
        return out

    def fp_qmm(self, x, wq, scales, mode, global_scale, transpose):
        op = torch.ops.metalq.fp_qmm_t if transpose else torch.ops.metalq.fp_qmm_n
        out = _poisoned(op(_meta(x), _meta(wq), _meta(scales), mode, _meta(global_scale)))
        self._run(metalq._C.plan_fp_qmm(x, wq, scales, global_scale, out, mode, transpose))
        return out


# ---- the emulator --------------------------------------------------------------------------------------

class Unavailable(Exception):
    """A requested device or tool is missing: a one-line message, exit status 2."""


class BuildFailed(Exception):
    """clang rejected the Metal sources for the emulator: a failure (exit status 1), not bad usage."""


def _is_emulator(module) -> bool:
    return all(hasattr(module, name) for name in ("load", "available", "Library"))


def find_emulator():
    """The tests/emulator package of a metalq source checkout, and the metal/ directory beside it.

    Looked for at METALQ_EMULATOR_PATH (a checkout, its tests/ directory or tests/emulator itself),
    else as an importable ``emulator``, else in the current directory's and metalq's own checkout.
    """
    configured = os.environ.get("METALQ_EMULATOR_PATH")
    if configured:
        candidates = [Path(configured)]
    else:
        try:
            module = importlib.import_module("emulator")
            if _is_emulator(module):
                return module, _metal_dir(Path(module.__file__).resolve().parent)
        except ImportError:
            pass
        candidates = [Path.cwd(), Path(metalq.__file__).resolve().parents[2]]
    for base in candidates:
        for package in (base, base / "emulator", base / "tests" / "emulator"):
            if (package / "__init__.py").is_file() and (package / "runtime.cpp").is_file():
                sys.path.insert(0, str(package.parent))
                try:
                    module = importlib.import_module("emulator")
                finally:
                    sys.path.remove(str(package.parent))
                if not _is_emulator(module) or Path(module.__file__).resolve().parent != package.resolve():
                    raise Unavailable(f"--emulator: another module named 'emulator' shadows {package}")
                return module, _metal_dir(package.resolve())
    if configured:
        raise Unavailable(f"--emulator: METALQ_EMULATOR_PATH={configured} holds no Metal emulator "
                          "(expected a metalq checkout with tests/emulator/__init__.py)")
    raise Unavailable("--emulator: the Metal emulator lives in a metalq source checkout (tests/emulator); "
                      "set METALQ_EMULATOR_PATH=/path/to/metalq-checkout or run from the checkout")


def _metal_dir(package: Path) -> Path:
    metal = package.parents[1] / "metal"
    if not (metal / "quantized.metal").is_file():
        raise Unavailable(f"--emulator: no metal/quantized.metal beside the emulator at {package}")
    return metal


def load_emulator():
    """(EmulatorBackend, description); raises Unavailable without the emulator or its clang, BuildFailed
    when the kernels do not compile."""
    emulator, metal = find_emulator()
    if not emulator.available():
        raise Unavailable(f"--emulator: the Metal emulator needs {emulator.CLANG}, which is not on PATH "
                          "(apt-get install clang-19, or set METALQ_EMULATOR_CLANG)")
    print(f"loading {metal / 'quantized.metal'} on the emulator (compiled on first use, about a minute; cached in "
          f"{emulator.CACHE})...", file=sys.stderr, flush=True)
    try:
        library = emulator.load(metal / "quantized.metal", (str(metal),))
    except emulator.BuildError as error:
        raise BuildFailed(f"--emulator: {emulator.CLANG} cannot build {metal / 'quantized.metal'}: "
                          f"{first_line(error)}") from None
    return EmulatorBackend(library), f"{Path(emulator.__file__).parent} (kernels from {metal}, {emulator.CLANG})"
