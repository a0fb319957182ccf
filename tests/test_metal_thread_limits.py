"""A representative set of the kernel tests (quantize/dequantize, qmv, qmm, split-K, gather, fp) on
pipelines whose maxTotalThreadsPerThreadgroup is 512 and 256, as some Macs report: every plan is
fitted with metalq._C.fit_thread_limit exactly as the Mac encoder does (emulator Library.run), and
the emulator rejects any threadgroup over the pipeline's limit. The checks are the kernel tests'
own, called with a library whose run() carries the limit. (No plan of metal/ exceeds 256 threads
today: the matmuls use at most 128, elementwise plans 256; the elementwise kernels also run at 96
and 64, where fit_thread_limit reshapes their grid.)"""
import pytest
import torch

import metalq
import test_metal_fp
import test_metal_gather
import test_metal_kernels
import test_metal_qmm
import test_metal_qmv

LIMITS = (512, 256)


class LimitedLibrary:
    """The kernel library on pipelines with maxTotalThreadsPerThreadgroup = limit."""

    def __init__(self, lib, limit):
        self._lib, self.limit = lib, limit
        self.plans = []

    def run(self, plan, order="forward", seed=0):
        fitted = metalq._C.fit_thread_limit(plan, self.limit)
        t = fitted["threads_per_threadgroup"]
        assert t[0] * t[1] * t[2] <= self.limit
        self.plans.append(fitted)
        return self._lib.run(plan, order, seed, thread_limit=self.limit)

    def __getattr__(self, name):
        return getattr(self._lib, name)


@pytest.fixture(params=LIMITS, ids=[f"limit{n}" for n in LIMITS])
def limited(request, lib):
    return LimitedLibrary(lib, request.param)


def test_quantize_and_dequantize(limited):
    # 300 x 64 and 2 x 7 x 384: over 256 work items, so the 1024-thread default plan is refitted.
    test_metal_kernels.test_random_shapes_match_cpu(limited, (300, 64), torch.float16, 64, 4)
    test_metal_kernels.test_random_shapes_match_cpu(limited, (2, 7, 384), torch.bfloat16, 128, 3)
    test_metal_kernels.test_quantize_matches_cpu(limited, torch.float32, 32, 5, "reverse")
    assert all(p["threads_per_threadgroup"][0] <= limited.limit for p in limited.plans)


@pytest.mark.parametrize("limit", [96, 64])
def test_elementwise_plans_refitted_below_256(lib, limit):
    limited = LimitedLibrary(lib, limit)
    test_metal_kernels.test_random_shapes_match_cpu(limited, (2, 7, 384), torch.bfloat16, 128, 3)
    test_metal_fp.test_quantize_matches_cpu(limited, "nvfp4", 0.37, "f16", "reverse")
    test_metal_fp.test_dequantize_matches_cpu(limited, "mxfp8", None, "f32", "forward")
    assert {p["threads_per_threadgroup"] for p in limited.plans} == {(limit, 1, 1)}


def test_qmv_every_branch(limited):
    # qmv_fast, qmv, qmv_wide, qmv_quad, qvm and qvm_split_k with its split_k_reduce
    test_metal_qmv.test_every_branch_matches_oracles(limited, torch.float16, 64, 4, "forward")


def test_qmm_and_split_k(limited):
    test_metal_qmm.test_qmm_t_every_format(limited, torch.bfloat16, 32, 3, "reverse")
    test_metal_qmm.test_shapes(limited, 33, 64, 1024, False, torch.bfloat16, 32, 3, 4, "random")  # split-K + reduce


@pytest.mark.parametrize("case", ["qmv_fast-topk", "qmm_n", "rhs_t"])
def test_gather(limited, case):
    test_metal_gather.test_every_branch_matches_oracles(limited, next(c for c in test_metal_gather.CASES
                                                                      if c[0] == case), "random")


def test_fp(limited):
    test_metal_fp.test_quantize_matches_cpu(limited, "nvfp4", 0.37, "f16", "forward")
    test_metal_fp.test_dequantize_matches_cpu(limited, "mxfp4", None, "bf16", "reverse")
    test_metal_fp.test_qmm_every_branch_matches_oracles(limited, "mxfp8", None, "f32", "forward")


def test_a_threadgroup_over_the_pipeline_limit_is_an_error(lib):
    import emulator

    q = metalq.affine_quantize(torch.randn(64, 256), 64, 4)
    (plan,) = metalq._C.plan_affine_qmm(torch.randn(32, 256), *q, torch.empty(32, 64), 64, 4, True)
    with pytest.raises(emulator.EmulatorError, match=rf"^{plan['kernel']}: threadgroup of 128 threads .* exceeds "
                                                     rf"the pipeline's maxTotalThreadsPerThreadgroup 64"):
        lib.dispatch(plan["kernel"], plan["threadgroups"], plan["threads_per_threadgroup"],
                     {**dict(plan["buffers"]), **dict(plan["bytes"])}, order="forward", thread_limit=64)
