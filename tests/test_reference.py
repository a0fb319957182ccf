"""The reference path (metalq.reference): every op in plain PyTorch, and the switch that selects it.

On CPU tensors the reference must give the CPU op's bits for quantize / dequantize / pack / unpack (affine
and fp), and matmuls within dtype tolerance of float64 torch and close to the CPU op. The switch
(METALQ_REFERENCE, metalq.reference_ops) routes the metalq wrappers, hence the modules, through it.
"""
import os
import subprocess
import sys

import pytest
import torch

import metalq
from metalq import reference as R

ops = torch.ops.metalq

BITS = (1, 2, 3, 4, 5, 6, 8)
GROUP_SIZES = (16, 32, 64, 128)
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 5e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # as tests/test_ops.py
FP_MODES = ("mxfp4", "nvfp4", "mxfp8")


def bits_of(t):
    """A tensor's bit pattern, so -0.0 counts as a difference (every NaN is one pattern: payloads and the
    sign of a NaN are the arithmetic unit's, not the format's)."""
    if t.is_floating_point():
        t = torch.where(t.isnan(), torch.full_like(t, float("nan")), t)
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_bit_equal(a, b, what=""):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    if a.is_floating_point():
        assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaNs differ"
    assert torch.equal(bits_of(a), bits_of(b)), f"{what}: {(bits_of(a) != bits_of(b)).sum()} elements differ"


def assert_matmul(y, y_cpu, x, b64, dtype, what=""):
    """y (reference) within TOL of float64 x @ b64 and within twice that of the CPU op's y_cpu."""
    ref = x.double() @ b64
    bound = TOL[dtype] * (x.double().abs() @ b64.abs()) + 1e-30
    assert y.dtype == dtype and y.shape == ref.shape == y_cpu.shape, what
    assert ((y.double() - ref).abs() <= bound).all(), f"{what}: vs float64 {((y.double() - ref).abs() / bound).max()}"
    assert ((y.double() - y_cpu.double()).abs() <= 2 * bound).all(), f"{what}: vs the CPU op"


def weight(shape, dtype, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale / shape[-1] ** 0.5).to(dtype)


# ---- every op against the CPU op over the grid ---------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_affine_ops_match_cpu(bits, group_size, dtype):
    K, N = 256, 24
    w = weight((N, K), dtype, seed=bits * 1000 + group_size)
    w[0, :group_size] = 0.0  # an all-zero group (q0 == 0 branch), and both signs of edge
    w[1, :group_size] = w[1, :group_size].abs()
    w[2, :group_size] = -w[2, :group_size].abs()
    wq, s, b = ops.affine_quantize(w, group_size, bits)
    for got, want, name in zip(R.affine_quantize(w, group_size, bits), (wq, s, b), ("wq", "scales", "biases")):
        assert_bit_equal(got, want, f"affine_quantize {name}")
    w_hat = ops.affine_dequantize(wq, s, b, group_size, bits)
    assert_bit_equal(R.affine_dequantize(wq, s, b, group_size, bits), w_hat, "affine_dequantize")
    q = ops.unpack(wq, bits)
    assert_bit_equal(R.unpack(wq, bits), q, "unpack")
    assert_bit_equal(R.pack(q, bits), wq, "pack")

    b64 = w_hat.double()
    for rows in (1, 5, 17):
        x = weight((rows, K), dtype, seed=rows, scale=K**0.5)
        assert_matmul(R.affine_qmm_t(x, wq, s, b, group_size, bits), ops.affine_qmm_t(x, wq, s, b, group_size, bits),
                      x, b64.t(), dtype, f"qmm_t rows={rows}")
    # qmm_n: w (K, N) packed along N
    wn = weight((K, 2 * group_size), dtype, seed=7)
    wqn, sn, bn = ops.affine_quantize(wn, group_size, bits)
    x = weight((3, K), dtype, seed=8, scale=K**0.5)
    assert_matmul(R.affine_qmm_n(x, wqn, sn, bn, group_size, bits), ops.affine_qmm_n(x, wqn, sn, bn, group_size, bits),
                  x, ops.affine_dequantize(wqn, sn, bn, group_size, bits).double(), dtype, "qmm_n")


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_arbitrary_words(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randint(-2**31, 2**31 - 1, (2, 3, 4 * bits), generator=gen, dtype=torch.int32).view(torch.uint32)
    q = ops.unpack(w, bits)
    assert_bit_equal(R.unpack(w, bits), q, "unpack")
    assert_bit_equal(R.pack(q, bits), ops.pack(q, bits), "pack")
    assert_bit_equal(R.pack(q[..., :0], bits), ops.pack(q[..., :0], bits), "empty pack")


def fp_cases():
    for mode in FP_MODES:
        for name, dtype in DTYPES.items():
            yield pytest.param(mode, dtype, False, id=f"{mode}-{name}")
        if mode == "nvfp4":
            for name, dtype in DTYPES.items():
                yield pytest.param(mode, dtype, True, id=f"{mode}-{name}-global")


@pytest.mark.parametrize("mode,dtype,with_global", fp_cases())
def test_fp_ops_match_cpu(mode, dtype, with_global):
    K, N = 256, 20
    g = torch.tensor(0.37) if with_global else None
    w = weight((N, K), dtype, seed=3, scale=30.0)
    w[0, :32] = 0.0
    w[1, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0] * 4, dtype=dtype)  # E2M1 midpoints
    w[2, :] = w[2, :] * 1e-30 if dtype != torch.float16 else w[2, :] * 1e-5  # tiny groups
    wq, s = ops.fp_quantize(w, mode, g)
    got = R.fp_quantize(w, mode, g)
    assert_bit_equal(got[0], wq, "fp_quantize wq")
    assert_bit_equal(got[1], s, "fp_quantize scales")
    for out in (None, torch.float32, torch.float16, torch.bfloat16):
        assert_bit_equal(R.fp_dequantize(wq, s, mode, g, out), ops.fp_dequantize(wq, s, mode, g, out),
                         f"fp_dequantize dtype={out}")
    b64 = ops.fp_dequantize(wq, s, mode, g, torch.float32).double()
    x = weight((4, K), dtype, seed=4, scale=K**0.5)
    assert_matmul(R.fp_qmm_t(x, wq, s, mode, g), ops.fp_qmm_t(x, wq, s, mode, g), x, b64.t(), dtype, "fp_qmm_t")
    wn = weight((K, 64), dtype, seed=5, scale=3.0)
    wqn, sn = ops.fp_quantize(wn, mode, g)
    assert_matmul(R.fp_qmm_n(x, wqn, sn, mode, g), ops.fp_qmm_n(x, wqn, sn, mode, g), x,
                  ops.fp_dequantize(wqn, sn, mode, g, torch.float32).double(), dtype, "fp_qmm_n")


def test_fp_dequantize_every_code():
    """Every element code and every scale code decodes as the CPU op (NaN codes, E8M0 0 and 255 included)."""
    for mode, bits, gs in (("mxfp4", 4, 32), ("nvfp4", 4, 16), ("mxfp8", 8, 32)):
        n = 1 << bits
        q = (torch.arange(256 * gs) % n).to(torch.uint8).view(256, gs)
        wq = ops.pack(q, bits)
        scales = torch.arange(256, dtype=torch.uint8).view(256, 1)
        for out in (None, torch.float32, torch.float16):
            assert_bit_equal(R.fp_dequantize(wq, scales, mode, None, out),
                             ops.fp_dequantize(wq, scales, mode, None, out), f"{mode} dtype={out}")


@pytest.mark.parametrize("gs, bits", ((64, 4), (16, 3)), ids=("gs64-b4", "gs16-b3"))
@pytest.mark.parametrize("transpose", (True, False), ids=("t", "n"))
def test_batched_and_gather_match_cpu(transpose, gs, bits):
    K, N, E, dtype = 128, 64, 4, torch.float32
    shape = (E, N, K) if transpose else (E, K, N)
    wq, s, b = ops.affine_quantize(weight(shape, dtype), gs, bits)
    dense = ops.affine_dequantize(wq, s, b, gs, bits).double()
    b64 = dense.mT if transpose else dense
    qmm_ref, qmm_cpu = (R.affine_qmm_t, ops.affine_qmm_t) if transpose else (R.affine_qmm_n, ops.affine_qmm_n)
    for xs in ((K,), (5, K), (2, 1, 3, K)):
        x = weight(xs, dtype, seed=len(xs), scale=K**0.5)
        y = qmm_ref(x, wq, s, b, gs, bits)
        want = torch.matmul(x.double(), b64)
        assert y.shape == want.shape and torch.allclose(y.double(), want, atol=1e-4, rtol=1e-4)
        assert torch.allclose(y, qmm_cpu(x, wq, s, b, gs, bits), atol=1e-4, rtol=1e-4)
    x = weight((6, 1, 2, K), dtype, seed=9, scale=K**0.5)
    rhs = torch.randint(0, E, (6, 3), generator=torch.Generator().manual_seed(2))
    for lhs in (None, torch.randint(0, 6, (1, 3), generator=torch.Generator().manual_seed(3))):
        args = (x, wq, s, b, lhs, rhs)
        y = R.affine_gather_qmm(*args, transpose=transpose, group_size=gs, bits=bits)
        y_cpu = ops.affine_gather_qmm(*args, transpose, gs, bits, False)
        x_items = x.reshape(6, 2, K)[(lhs if lhs is not None else torch.arange(6).view(6, 1)).expand(6, 3)]
        want = x_items.double() @ b64[rhs]
        assert y.shape == y_cpu.shape == want.shape
        assert torch.allclose(y.double(), want, atol=1e-4, rtol=1e-4)
        assert torch.allclose(y, y_cpu, atol=1e-4, rtol=1e-4)


# ---- errors: the ops' own ------------------------------------------------------------------------

def raised(f):
    with pytest.raises(Exception) as info:
        f()
    return info.type, str(info.value)


def test_errors_are_the_ops_errors():
    wq, s, b = ops.affine_quantize(weight((8, 128), torch.float32), 64, 4)
    wq3, s3, b3 = ops.affine_quantize(weight((4, 8, 128), torch.float32), 64, 4)
    fq, fs = ops.fp_quantize(weight((8, 64), torch.float32), "mxfp4")
    nan = torch.full((2, 64), float("nan"))
    cases = [
        ("affine_quantize", (torch.randn(4, 60), 64, 4)),
        ("affine_quantize", (torch.randn(4, 64), 64, 7)),
        ("affine_quantize", (torch.randn(4, 48), 16, 5)),  # K * bits not whole uint32 words
        ("affine_quantize", (nan, 64, 4)),
        ("affine_dequantize", (wq, s, b.half(), 64, 4)),
        ("affine_qmm_t", (torch.randn(3, 64), wq, s, b, 64, 4)),
        ("affine_qmm_n", (torch.randn(3, 8), wq, s.half(), b.half(), 64, 4)),
        ("affine_qmm_t", (torch.randn(3, 128, device="meta"), wq, s, b, 64, 4)),  # two devices
        ("affine_gather_qmm", (torch.randn(2, 3, 128), wq3, s3, b3, None, torch.tensor([0, 4]), True, 64, 4, False)),
        ("affine_gather_qmm", (torch.randn(2, 3, 128), wq3, s3, b3, torch.tensor([-1, 0]), None, True, 64, 4, False)),
        ("affine_gather_qmm", (torch.randn(2, 3, 128), wq3, s3, b3, None, torch.tensor([0.0]), True, 64, 4, False)),
        ("fp_quantize", (torch.randn(4, 64), "mxfp5", None)),
        ("fp_quantize", (torch.randn(4, 64), "mxfp4", torch.tensor(1.0))),
        ("fp_quantize", (nan, "nvfp4", None)),
        ("fp_dequantize", (fq, fs.float(), "mxfp4", None, None)),
        ("fp_dequantize", (fq, fs, "mxfp4", None, torch.int32)),
        ("fp_qmm_t", (torch.randn(3, 32), fq, fs, "mxfp4", None)),
        ("fp_qmm_n", (torch.randn(3, 64, device="meta"), fq, fs, "mxfp8", None)),
        ("pack", (torch.full((2, 32), 4, dtype=torch.uint8), 2)),
        ("pack", (torch.zeros(2, 30, dtype=torch.uint8), 4)),
        ("unpack", (torch.zeros(2, 3, dtype=torch.int32), 4)),
    ]
    for name, args in cases:
        if name == "affine_gather_qmm":
            ref = lambda a=args: R.affine_gather_qmm(*a[:6], transpose=a[6], group_size=a[7], bits=a[8],  # noqa: E731
                                                     sorted_indices=a[9])
        else:
            ref = lambda a=args, n=name: getattr(R, n)(*a)  # noqa: E731
        want = raised(lambda a=args, n=name: getattr(ops, n)(*a))
        assert raised(ref) == want, name


# ---- the switch ----------------------------------------------------------------------------------

def run_python(code, **env):
    full_env = {k: v for k, v in os.environ.items() if k != R.ENV_VAR}
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(metalq.__file__), ".."),
                                              full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_switch_from_environment():
    code = ("import metalq, metalq.reference as R; print(metalq.reference_enabled())\n"
            "with metalq.reference_ops(False): print(metalq.reference_enabled())\n"
            "print(metalq.reference_enabled())")
    on = run_python(code, METALQ_REFERENCE="1")
    assert on.returncode == 0, on.stderr
    assert on.stdout.split() == ["True", "False", "True"]
    assert "METALQ_REFERENCE=1" in on.stderr  # it says so: never silent
    off = run_python(code, METALQ_REFERENCE="0")
    assert off.returncode == 0 and off.stdout.split() == ["False", "False", "False"], off.stderr
    assert off.stderr == ""
    bad = run_python("import metalq", METALQ_REFERENCE="maybe")
    assert bad.returncode != 0 and "METALQ_REFERENCE='maybe' is not understood" in bad.stderr


def test_environment_switch_routes_the_wrappers():
    code = ("import torch, metalq, metalq.reference as R\n"
            "calls = []\n"
            "real = R.affine_qmm_t\n"
            "R.affine_qmm_t = lambda *a: calls.append(1) or real(*a)\n"
            "lin = metalq.MetalLinear.from_linear(torch.nn.Linear(64, 8), bits=4, group_size=64)\n"
            "lin(torch.randn(2, 64)); print(len(calls))")
    assert run_python(code, METALQ_REFERENCE="1").stdout.split() == ["1"]
    assert run_python(code).stdout.split() == ["0"]


def test_context_manager_nests_and_restores():
    assert not metalq.reference_enabled()
    with metalq.reference_ops():
        assert metalq.reference_enabled()
        with metalq.reference_ops(False):
            assert not metalq.reference_enabled()
            with metalq.reference_ops(True):
                assert metalq.reference_enabled()
            assert not metalq.reference_enabled()
        assert metalq.reference_enabled()
        with pytest.raises(KeyError):
            with metalq.reference_ops(False):
                raise KeyError("restored on error too")
        assert metalq.reference_enabled()
    assert not metalq.reference_enabled()


class Spy:
    """Stands in for torch.ops.metalq in metalq.ops and counts the kernel calls made through it."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            return getattr(ops, name)(*args)
        return call


@pytest.mark.parametrize("mode", ("affine", "mxfp4"))
def test_metal_linear_under_the_switch_runs_the_reference(monkeypatch, mode):
    import metalq.ops as wrappers

    lin = (metalq.MetalLinear.from_linear(torch.nn.Linear(128, 16), bits=4, group_size=64) if mode == "affine"
           else metalq.MetalLinear.from_linear(torch.nn.Linear(128, 16), mode=mode))
    x = torch.randn(3, 128)
    y_kernel = lin(x)
    spy = Spy()
    monkeypatch.setattr(wrappers, "_ops", spy)
    name = "affine_qmm_t" if mode == "affine" else "fp_qmm_t"
    counted = []
    real = getattr(R, name)
    monkeypatch.setattr(R, name, lambda *a: counted.append(1) or real(*a))
    with metalq.reference_ops():
        y_ref = lin(x)
        lin.dequantize()
    assert counted == [1] and spy.calls == []  # the reference ran, no kernel did
    assert torch.allclose(y_ref, y_kernel, atol=1e-5, rtol=1e-5)
    lin(x)
    assert spy.calls == [name]  # switch off again: the kernel


def test_every_wrapper_routes(monkeypatch):
    import metalq.ops as wrappers

    spy = Spy()
    monkeypatch.setattr(wrappers, "_ops", spy)
    w = weight((8, 64), torch.float32)
    x = torch.randn(2, 64)
    with metalq.reference_ops():
        wq, s, b = metalq.affine_quantize(w, 32, 4)
        metalq.affine_dequantize(wq, s, b, 32, 4)
        metalq.affine_qmm_t(x, wq, s, b, 32, 4)
        metalq.affine_qmm_n(torch.randn(2, 8), *metalq.affine_quantize(weight((8, 64), torch.float32), 32, 4), 32, 4)
        metalq.affine_gather_qmm(x.view(1, 2, 64), wq.unsqueeze(0), s.unsqueeze(0), b.unsqueeze(0), group_size=32,
                                 bits=4)
        fq, fs = metalq.fp_quantize(w, "mxfp8")
        metalq.fp_dequantize(fq, fs, "mxfp8")
        metalq.fp_qmm_t(x, fq, fs, "mxfp8")
        metalq.fp_qmm_n(torch.randn(2, 8), fq, fs, "mxfp8")
        metalq.unpack(metalq.pack(torch.zeros(4, 32, dtype=torch.uint8), 3), 3)
    assert spy.calls == []


# ---- autograd, meta, compile ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("f32", "bf16"))
def test_gradients_for_x(dtype):
    wq, s, b = ops.affine_quantize(weight((24, 128), dtype), 64, 3)
    fq, fs = ops.fp_quantize(weight((24, 128), dtype), "nvfp4")
    wq3, s3, b3 = ops.affine_quantize(weight((3, 24, 128), dtype), 64, 3)
    rhs = torch.tensor([[0, 2], [1, 1], [2, 0]])
    cases = [
        (lambda x: R.affine_qmm_t(x, wq, s, b, 64, 3), lambda x: ops.affine_qmm_t(x, wq, s, b, 64, 3), (5, 128)),
        (lambda x: R.affine_qmm_n(x, wq, s, b, 64, 3), lambda x: ops.affine_qmm_n(x, wq, s, b, 64, 3), (5, 24)),
        (lambda x: R.affine_qmm_t(x, wq3, s3, b3, 64, 3), lambda x: ops.affine_qmm_t(x, wq3, s3, b3, 64, 3), (128,)),
        (lambda x: R.fp_qmm_t(x, fq, fs, "nvfp4"), lambda x: ops.fp_qmm_t(x, fq, fs, "nvfp4"), (2, 3, 128)),
        (lambda x: R.affine_gather_qmm(x, wq3, s3, b3, rhs_indices=rhs, group_size=64, bits=3),
         lambda x: ops.affine_gather_qmm(x, wq3, s3, b3, None, rhs, True, 64, 3, False), (3, 1, 2, 128)),
    ]
    for ref, op, shape in cases:
        x = torch.randn(shape).to(dtype).requires_grad_()
        g = torch.randn_like(op(x))
        (gx_ref,) = torch.autograd.grad(ref(x), x, g)
        (gx_op,) = torch.autograd.grad(op(x), x, g)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        assert gx_ref.shape == x.shape and torch.allclose(gx_ref.float(), gx_op.float(), atol=tol, rtol=tol)
    # the fp-mode tensors stay frozen, as with the ops (affine scales and biases learn: test_scale_grads.py)
    x = torch.randn(2, 128, dtype=dtype, requires_grad=True)
    global_scale = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(RuntimeError, match="frozen"):
        R.fp_qmm_t(x, fq, fs, "nvfp4", global_scale).sum().backward()


def test_meta_tensors_and_compile():
    meta = torch.device("meta")
    wq, s, b = (t.to(meta) for t in ops.affine_quantize(weight((16, 128), torch.float16), 64, 4))
    x = torch.randn(3, 128, dtype=torch.float16, device=meta)
    for ref, op in ((R.affine_qmm_t(x, wq, s, b, 64, 4), ops.affine_qmm_t(x, wq, s, b, 64, 4)),
                    (R.affine_quantize(torch.empty(4, 128, device=meta), 64, 4)[0], ops.affine_quantize(
                        torch.empty(4, 128, device=meta), 64, 4)[0]),
                    (R.fp_dequantize(wq, s.to(torch.uint8)[:, :1].expand(16, 4).contiguous(), "mxfp4"),
                     ops.fp_dequantize(wq, s.to(torch.uint8)[:, :1].expand(16, 4).contiguous(), "mxfp4"))):
        assert ref.device == meta and ref.shape == op.shape and ref.dtype == op.dtype

    lin = metalq.MetalLinear.from_linear(torch.nn.Linear(128, 16), bits=4, group_size=64)
    x = torch.randn(2, 128)
    torch._dynamo.reset()
    with metalq.reference_ops():
        y = torch.compile(lin, fullgraph=True, backend="eager")(x)
        assert torch.allclose(y, R.affine_qmm_t(x, lin.weight, lin.scales, lin.qbiases, 64, 4) + lin.bias)
    torch._dynamo.reset()
