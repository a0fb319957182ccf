"""Self-tests of the Metal emulator (tests/emulator): compile-time address-space checks, the
scheduler (barriers, SIMD-group functions, simdgroup_matrix), Metal's rules and the byte counters.
The oracles are numpy and hand-derived Metal semantics, never the emulator itself."""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import emulator
from conftest import require

SELFTEST = Path(__file__).parent / "emulator" / "kernels" / "selftest.metal"


@pytest.fixture(scope="module")
def lib():
    require(emulator.available(), f"{emulator.CLANG} (apt-get install clang-19)")
    return emulator.load(SELFTEST)


# ---- compile-time checks ---------------------------------------------------------------------------

_PASSES_THREADGROUP_AS_DEVICE = """#include <metal_stdlib>
using namespace metal;
void consume(device float* p) { p[0] = 1.0f; }
[[kernel]] void k(device float* out [[buffer(0)]], uint i [[thread_index_in_threadgroup]]) {
  threadgroup float staged[32];
  consume(@);
  out[i] = staged[i];
}
"""
_WRITES_CONSTANT = """#include <metal_stdlib>
using namespace metal;
[[kernel]] void k(@ float* c [[buffer(0)]], uint i [[thread_index_in_threadgroup]]) {
  c[i] = 1.0f;
}
"""


@pytest.mark.parametrize(
    "template, wrong, right, line, message",
    [
        (_PASSES_THREADGROUP_AS_DEVICE, "staged", "out", 6, "no matching function"),
        (_WRITES_CONSTANT, "constant", "device", 4, "read-only variable is not assignable"),
    ],
    ids=["threadgroup-pointer-as-device", "write-to-constant"],
)
def test_address_space_misuse_fails_to_compile(tmp_path, template, wrong, right, line, message):
    require(emulator.available(), f"{emulator.CLANG} (apt-get install clang-19)")
    bad = tmp_path / "bad.metal"
    bad.write_text(template.replace("@", wrong))
    with pytest.raises(emulator.BuildError) as err:
        emulator.build(bad)
    assert f"bad.metal:{line}:" in str(err.value) and message in str(err.value)
    good = tmp_path / "good.metal"  # the same file, corrected, compiles: the failure was the misuse
    good.write_text(template.replace("@", right))
    assert emulator.build(good).exists()


# ---- Metal language conformance: what Apple's compiler rejects, the emulator's build rejects -------
# Each rule: a file with one placeholder `@`, its wrong spelling (rejected with a diagnostic on the
# placeholder's .metal line) and its corrected spelling (builds). Enforced by the conformance pass
# (emulator.check, clang's C++ for OpenCL mode) or by rewrite.py's kernel-signature checks.

def _kernel(decl="", body="out[i] = 1.0f;"):
    return (f"#include <metal_stdlib>\nusing namespace metal;\n{decl}\n"
            f"[[kernel]] void k(device float* out [[buffer(0)]], uint i [[thread_position_in_grid]]) {{\n"
            f"  {body}\n}}\n")


_TEMPLATE_KERNEL = """#include <metal_stdlib>
using namespace metal;
template <typename Out>
[[kernel]] void k(@ out [[buffer(0)]], uint i [[thread_position_in_grid]]) { out[i] = 1.0f; }
template [[host_name("k")]] [[kernel]] decltype(k<device float*>) k<device float*>;
"""
_SIGNATURE = """#include <metal_stdlib>
using namespace metal;
[[kernel]] void k(device float* out [[buffer(0)]], @) { out[0] = 1.0f; }
"""

_CONFORMANCE_RULES = {
    # name: (template, wrong, right, message)
    "program-scope-variable-not-constant": (
        _kernel("@float kScale = 2.0f;", "out[i] = kScale;"), "", "constant ", "must be in the constant address space"),
    "static-data-member-not-constant": (
        _kernel("struct Format { static @constexpr int bits = 4; };", "out[i] = float(Format::bits);"), "",
        "constant ", "static data members) must be in the constant address space"),
    "static-local-not-constant": (
        _kernel("", "static @int calls = 0; out[i] = float(calls);"), "", "constant ",
        "static local variables must be in the constant address space"),
    "double": (_kernel("", "out[i] = float(@(i) * 0.5f);"), "double", "float", "Metal has no type 'double'"),
    "long-double": (_kernel("", "@ half_i = i * 0.5f; out[i] = float(half_i);"), "long double", "float",
                    "Metal has no type 'long double'"),
    "virtual-function": (
        _kernel("struct Shape { @float area() const { return 1.0f; } };", "out[i] = Shape().area();"), "virtual ", "",
        "virtual functions are not supported in Metal"),
    "throw": (_kernel("", "if (i > 1024) { @; } out[i] = 1.0f;"), "throw 1", "return",
              "cannot use 'throw' with exceptions disabled"),
    "try-catch": (_kernel("", "@"), "try { out[i] = 1.0f; } catch (...) {}", "{ out[i] = 1.0f; }",
                  "cannot use 'try' with exceptions disabled"),
    "new-delete": (_kernel("", "@"), "float* p = new float(1.0f); out[i] = *p; delete p;",
                   "float v = 1.0f; out[i] = v;", "'default new' is not supported in Metal"),
    "thread_local": (_kernel("", "@int x = 1; out[i] = float(x);"), "thread_local ", "",
                     "does not support the 'thread_local' storage class specifier"),
    "register": (_kernel("", "@int x = 1; out[i] = float(x);"), "register ", "",
                 "Metal does not support the 'register' storage class specifier"),
    "typeid": (_kernel("", "@out[i] = 1.0f;"), "(void)typeid(float); ", "", "'typeid' is not supported in Metal"),
    "goto": (_kernel("", "@out[i] = 1.0f;"), "goto done; done: ", "", "`goto`: Metal has no goto"),
    "noexcept": (_kernel("inline float one() @{ return 1.0f; }", "out[i] = one();"), "noexcept ", "",
                 "`noexcept`: Metal has no noexcept"),
    "kernel-returns-void": (_kernel().replace("[[kernel]] void k(", "[[kernel]] @ k("), "float", "void",
                            "a [[kernel]] function must return void"),
    "buffer-address-space-in-template-argument": (
        _TEMPLATE_KERNEL, "Out", "device float*", "must be a pointer or reference to device or constant memory"),
    "buffer-without-address-space": (
        _kernel().replace("device float* out", "@float* out"), "", "device ",
        "must be a pointer or reference to device or constant memory"),
    "buffer-by-value": (_SIGNATURE, "uint n [[buffer(1)]]", "constant uint& n [[buffer(1)]]",
                        "must be a pointer or reference to device or constant memory"),
    "buffer-index-range": (_SIGNATURE, "constant uint& n [[buffer(31)]]", "constant uint& n [[buffer(30)]]",
                           "[[buffer(31)]] is outside the argument table (indices 0..30)"),
    "threadgroup-index-range": (_SIGNATURE, "threadgroup float* t [[threadgroup(31)]]",
                                "threadgroup float* t [[threadgroup(30)]]",
                                "[[threadgroup(31)]] is outside the argument table"),
    "threadgroup-parameter-address-space": (
        _SIGNATURE, "device float* t [[threadgroup(0)]]", "threadgroup float* t [[threadgroup(0)]]",
        "must be a pointer or reference to threadgroup memory"),
    "builtin-position-type": (_SIGNATURE, "int i [[thread_position_in_grid]]", "ushort2 i [[thread_position_in_grid]]",
                              "[[thread_position_in_grid]] cannot be declared `int`"),
    "builtin-index-type": (_SIGNATURE, "uint2 lane [[thread_index_in_simdgroup]]",
                           "ushort lane [[thread_index_in_simdgroup]]",
                           "[[thread_index_in_simdgroup]] cannot be declared `uint2`"),
}


@pytest.mark.parametrize("rule", sorted(_CONFORMANCE_RULES))
def test_metal_rule_is_enforced(tmp_path, rule):
    require(emulator.available(), f"{emulator.CLANG} (apt-get install clang-19)")
    template, wrong, right, message = _CONFORMANCE_RULES[rule]
    line = template[:template.index("@")].count("\n") + 1
    bad = tmp_path / "bad.metal"
    bad.write_text(template.replace("@", wrong))
    with pytest.raises(emulator.BuildError) as err:
        emulator.build(bad)
    assert f"bad.metal:{line}:" in str(err.value) and message in str(err.value), str(err.value)
    good = tmp_path / "good.metal"
    good.write_text(template.replace("@", right))
    assert emulator.build(good).exists()


def test_if_constexpr_is_accepted(tmp_path):
    # MSL is C++14-based, but MLX relies on `if constexpr` (a C++17 extension Apple's compiler accepts).
    require(emulator.available(), f"{emulator.CLANG} (apt-get install clang-19)")
    source = tmp_path / "if_constexpr.metal"
    source.write_text(_kernel("template <int N> float twice() { if constexpr (N > 0) { return 2.0f * N; } "
                              "else { return 0.0f; } }", "out[i] = twice<2>();"))
    emulator.check(source)


def test_builds_are_cached():
    require(emulator.available(), f"{emulator.CLANG} (apt-get install clang-19)")
    first = emulator.build(SELFTEST)
    mtime = first.stat().st_mtime_ns
    assert emulator.build(SELFTEST) == first and first.stat().st_mtime_ns == mtime


# ---- scheduling and synchronisation ----------------------------------------------------------------

def _neighbour(lib, shift, synchronized, order, n=64):
    x = torch.arange(n, dtype=torch.float32)
    out = torch.full((n,), -1.0)
    lib.dispatch("neighbour", (1, 1, 1), (n, 1, 1), {0: x, 1: out, 2: struct.pack("ii", shift, synchronized)},
                 order=order)
    return out, torch.roll(x, -shift)


@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
@pytest.mark.parametrize("shift", [1, -1])
def test_barrier_orders_threadgroup_memory(lib, order, shift):
    out, expected = _neighbour(lib, shift, True, order)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("shift, order", [(1, "forward"), (-1, "reverse")])
def test_missing_barrier_is_caught(lib, shift, order):
    # Reading a thread that has not run yet yields the NaN poison of fresh threadgroup memory; each
    # direction of the race needs the thread order that runs the reader first, hence two orders.
    out, _ = _neighbour(lib, shift, False, order)
    assert torch.isnan(out).sum() >= 63


def test_dynamic_threadgroup_memory(lib):
    x = torch.arange(64, dtype=torch.float32)
    out = torch.zeros(64)
    lib.dispatch("neighbour_dynamic", (1, 1, 1), (64, 1, 1), {0: x, 1: out}, threadgroup_memory={0: 256})
    assert torch.equal(out, torch.roll(x, -1))


@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
def test_simd_functions_match_numpy(lib, order):
    n, active = 96, 11
    x = torch.randn(n, generator=torch.Generator().manual_seed(1))
    out = torch.full((n, 8), -7.0)
    lib.dispatch("simd_functions", (1, 1, 1), (n, 1, 1), {0: x, 1: out, 2: struct.pack("I", active)}, order=order)
    v = x.numpy().astype(np.float64).reshape(-1, 32)
    lane = np.arange(32)
    got = out.numpy().reshape(-1, 32, 8)
    np.testing.assert_allclose(got[..., 0], np.repeat(v.sum(1, keepdims=True), 32, 1), rtol=1e-5)
    np.testing.assert_array_equal(got[..., 1], np.repeat(v.max(1, keepdims=True), 32, 1))
    np.testing.assert_array_equal(got[..., 2], v[:, lane * 7 % 32])
    np.testing.assert_array_equal(got[..., 3], v[:, np.where(lane + 3 < 32, lane + 3, lane)])
    np.testing.assert_array_equal(got[..., 4], v[:, np.where(lane >= 5, lane - 5, lane)])
    np.testing.assert_array_equal(got[..., 5], v[:, lane ^ 6])
    np.testing.assert_array_equal(got[..., 6], np.repeat(v[:, 9:10], 32, 1))
    # Only lanes < active took part in the second simd_sum; the others kept the -7 sentinel.
    np.testing.assert_allclose(got[:, :active, 7], np.repeat(v[:, :active].sum(1, keepdims=True), active, 1),
                               rtol=1e-5)
    assert (got[:, active:, 7] == -7.0).all()


def test_simdgroup_matrix_lane_layout(lib):
    # MLX's steel MMA (BaseMMAFrag::get_coord) assumes lane l holds (row, col) and (row, col + 1) with
    # q = l // 4, row = (q & 4) + (l // 2) % 4, col = (q & 2) * 2 + (l % 2) * 2.
    out = torch.zeros(64)
    lib.dispatch("simdgroup_layout", (1, 1, 1), (32, 1, 1), {0: torch.arange(64, dtype=torch.float32), 1: out})
    lane = np.arange(32)
    q = lane // 4
    first = ((q & 4) + (lane // 2) % 4) * 8 + (q & 2) * 2 + (lane % 2) * 2
    np.testing.assert_array_equal(out.numpy().reshape(32, 2), np.stack([first, first + 1], 1))


@pytest.mark.parametrize("dtype, name, rtol", [(torch.float32, "float", 1e-5), (torch.float16, "half", 2e-2)])
def test_simdgroup_matrix_matches_numpy(lib, dtype, name, rtol):
    M, K, N = 24, 32, 40
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(M, K, generator=g).to(dtype), torch.randn(K, N, generator=g).to(dtype)
    c = torch.full((M, N), float("nan"), dtype=dtype)
    traffic = lib.dispatch(f"matmul_8x8_{name}", (N // 8, M // 8, 1), (32, 1, 1),
                           {0: a, 1: b, 2: c, 3: struct.pack("4I", M, K, N, 0)}, order="reverse")
    expected = a.double().numpy() @ b.double().numpy()
    np.testing.assert_allclose(c.double().numpy(), expected, rtol=rtol, atol=rtol * 4)
    # Each output tile reads a row block of A and a column block of B: A is read N/8 times, B M/8 times.
    size = dtype.itemsize
    assert traffic[0] == emulator.Traffic(M * K * size * N // 8, 0, M * K * size, 0)
    assert traffic[1] == emulator.Traffic(K * N * size * M // 8, 0, K * N * size, 0)
    assert traffic[2] == emulator.Traffic(0, M * N * size, 0, M * N * size)


def test_half_and_bfloat_round_every_operation(lib):
    # 2048 + 1 rounds back to 2048 in half (ties to even), and 256 + 1 to 256 in bfloat: twice.
    x = torch.tensor([2048.0, 256.0])
    lib.dispatch("add_one_twice", (1, 1, 1), (2, 1, 1), {0: x})
    assert x.tolist() == [2048.0, 256.0]


def test_vector_constructors_and_half_literals(lib):
    out = torch.zeros(4, 4)
    lib.dispatch("vectors", (1, 1, 1), (1, 1, 1), {0: out})
    third = float(np.float16(1) / np.float16(3))
    expected = [[0.5] * 4, [1, 2, 3, 4], [-1, 2, -3, 4], [1.5, 2, float(np.float16(0.1)), third]]
    assert out.tolist() == expected


# ---- Metal's rules are errors --------------------------------------------------------------------

@pytest.mark.parametrize(
    "kernel, threads, message",
    [
        ("divergent_barrier", 64, "is not reached by thread 16, which returned"),
        ("return_before_barrier", 64, "not reached by thread 3, which returned"),
        ("inactive_lane_read", 32, "reads an inactive lane at"),
        ("threadgroup_memory_over_limit", 64, "threadgroup memory exceeds 32768 bytes"),
        ("out_of_bounds", 65, "out-of-bounds access: 4 bytes at offset 256 of a 256-byte buffer"),
        ("out_of_bounds", 1025, "threads per threadgroup must be 1..1024"),
    ],
)
def test_rule_violations_are_errors(lib, kernel, threads, message):
    with pytest.raises(emulator.EmulatorError, match=message):
        lib.dispatch(kernel, (1, 1, 1), (threads, 1, 1), {0: torch.zeros(64)})


def test_errors_name_the_metal_line(lib):
    lines = SELFTEST.read_text().splitlines()
    kernel = next(i for i, text in enumerate(lines) if "void divergent_barrier" in text)
    barrier = next(i for i in range(kernel, len(lines)) if "threadgroup_barrier" in lines[i]) + 1
    with pytest.raises(emulator.EmulatorError, match=f"selftest.metal:{barrier} is not reached"):
        lib.dispatch("divergent_barrier", (1, 1, 1), (64, 1, 1), {0: torch.zeros(64)})


def test_traffic_counts_each_binding(lib):
    out, _ = _neighbour(lib, 1, True, "forward", n=128)
    x = torch.arange(128, dtype=torch.float32)
    params = struct.pack("ii", 1, 1)
    traffic = lib.dispatch("neighbour", (1, 1, 1), (128, 1, 1), {0: x, 1: out, 2: params})
    assert traffic[0] == emulator.Traffic(512, 0, 512, 0)
    assert traffic[1] == emulator.Traffic(0, 512, 0, 512)
    assert traffic[2] == emulator.Traffic(128 * 8, 0, 8, 0)  # every thread reads both fields


# ---- Metal's limits: each violation is an EmulatorError naming the kernel; within the limit it runs --

@pytest.mark.parametrize("limit", [1024, 512, 256])
def test_pipeline_thread_limit(lib, limit):
    # maxTotalThreadsPerThreadgroup of the pipeline: a threadgroup of `limit` threads runs, one more
    # SIMD-group does not (whatever the shape of the threadgroup).
    x = torch.arange(limit, dtype=torch.float32)
    out = torch.zeros(limit)
    lib.dispatch("neighbour", (1, 1, 1), (limit, 1, 1), {0: x, 1: out, 2: struct.pack("ii", 1, 1)},
                 thread_limit=limit)
    assert torch.equal(out, torch.roll(x, -1))
    if limit < 1024:
        with pytest.raises(emulator.EmulatorError, match=rf"^neighbour: threadgroup of {limit + 32} threads "
                                                         rf"\(32x{limit // 32 + 1}x1\) exceeds the pipeline's "
                                                         rf"maxTotalThreadsPerThreadgroup {limit}"):
            lib.dispatch("neighbour", (1, 1, 1), (32, limit // 32 + 1, 1), {0: torch.zeros(limit + 32),
                         1: torch.zeros(limit + 32), 2: struct.pack("ii", 1, 1)}, thread_limit=limit)


def test_set_bytes_payload_is_at_most_4_kb(lib):
    n = 1024  # 1024 floats: exactly 4096 bytes
    values = torch.randn(n + 1, generator=torch.Generator().manual_seed(3))
    out = torch.zeros(n + 1)
    lib.dispatch("copy_bytes", (1, 1, 1), (n, 1, 1),
                 {0: values[:n].numpy().tobytes(), 1: out, 2: struct.pack("I", n)})
    assert torch.equal(out[:n], values[:n])
    with pytest.raises(emulator.EmulatorError, match=r"^copy_bytes: setBytes payload for buffer\(0\) is 4100 bytes"):
        lib.dispatch("copy_bytes", (1, 1, 1), (n, 1, 1),
                     {0: values.numpy().tobytes(), 1: out, 2: struct.pack("I", n + 1)})


@pytest.mark.parametrize("vector, size, dtype", [("float4", 16, torch.float32), ("half4", 8, torch.float16),
                                                 ("uint2", 8, torch.int32), ("float", 4, torch.float32)])
@pytest.mark.parametrize("space", ["device", "threadgroup"])
def test_vector_accesses_are_naturally_aligned(lib, vector, size, dtype, space):
    kernel = f"vector_at_offset_{vector}"
    data = torch.arange(64, dtype=torch.uint8)
    out = torch.zeros(size // dtype.itemsize, dtype=dtype)
    lib.dispatch(kernel, (1, 1, 1), (1, 1, 1), {0: data, 1: out, 2: struct.pack("II", size, 2 * size)})
    assert out.view(torch.uint8).tolist() == list(range(size, 2 * size))
    # Half the natural alignment (the vector's size): a load from device memory, a store to threadgroup memory.
    offsets = (size + size // 2, 0) if space == "device" else (0, size // 2)
    where = f"load at offset {offsets[0]} of buffer\\(0\\)" if space == "device" else \
        f"store at offset {offsets[1]} of threadgroup memory"
    with pytest.raises(emulator.EmulatorError, match=rf"^{kernel}: misaligned {size}-byte {where} "):
        lib.dispatch(kernel, (1, 1, 1), (1, 1, 1), {0: data, 1: out, 2: struct.pack("II", *offsets)})


@pytest.mark.parametrize("dynamic, fits", [(16 * 1024, True), (16 * 1024 + 16, False), (32 * 1024 + 16, False)])
def test_threadgroup_memory_limit_counts_static_and_dynamic(lib, dynamic, fits):
    # 16 KiB declared in the kernel plus setThreadgroupMemoryLength(dynamic): at most 32 KiB in all.
    out = torch.zeros(64)
    run = lambda: lib.dispatch("static_and_dynamic_threadgroup_memory", (1, 1, 1), (64, 1, 1), {0: out},
                               threadgroup_memory={0: dynamic})
    if fits:
        run()
        assert torch.equal(out, torch.arange(64, dtype=torch.float32) + 1)
    else:
        with pytest.raises(emulator.EmulatorError,
                           match=r"^static_and_dynamic_threadgroup_memory: threadgroup memory exceeds 32768 bytes"):
            run()


# ---- SIMD-groups advance independently between barriers --------------------------------------------

def _overwrite_after_read(lib, synchronized, order, seed=0, n=128):
    x = torch.arange(n, dtype=torch.float32)
    out = torch.zeros(n)
    lib.dispatch("overwrite_after_read", (1, 1, 1), (n, 1, 1), {0: x, 1: out, 2: struct.pack("i", synchronized)},
                 order=order, seed=seed)
    lane = torch.arange(n)
    return out, ((lane ^ 1) + 32) % n


@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
def test_barrier_orders_simdgroups(lib, order):
    out, expected = _overwrite_after_read(lib, True, order)
    assert torch.equal(out, expected.float())


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_simdgroup_running_ahead_catches_write_after_read(lib, order):
    # forward: SIMD-group 0 overwrites its slots before SIMD-group 3 reads them; reverse: SIMD-group 3
    # overwrites before SIMD-group 2 reads. Either way one whole SIMD-group reads -1.
    out, expected = _overwrite_after_read(lib, False, order)
    assert (out == -1).sum() >= 32 and not torch.equal(out, expected.float())


def test_random_simdgroup_interleavings_are_seeded(lib):
    runs = [_overwrite_after_read(lib, False, "random", seed)[0] for seed in (1, 1, 2, 3, 4)]
    assert torch.equal(runs[0], runs[1])
    assert any((out == -1).any() for out in runs)


def test_threadgroup_memory_is_poisoned_for_every_threadgroup(lib):
    out = torch.zeros(4, 64)
    lib.dispatch("threadgroup_memory_is_fresh", (4, 1, 1), (64, 1, 1), {0: out})
    assert (out[0] == 1).all() and torch.isnan(out[1:]).all()
