"""``python -m metalq doctor``: the report, its exit status, failures caught into rows, bad usage, the emulator."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metalq
import metalq.ops
from conftest import require
from metalq import doctor
from metalq.__main__ import main

TESTS = Path(__file__).resolve().parent
OPS = ("pack", "unpack", "affine_quantize", "affine_dequantize", "affine_qmm_t", "affine_qmm_n", "affine_gather_qmm",
       "fp_quantize", "fp_dequantize", "fp_qmm_t", "fp_qmm_n")
PLANNED = set(OPS)  # every op has a metalq._C.plan_* (pack / unpack: plan_pack, plan_unpack)
ROW = re.compile(r"^(?P<op>\w+)\s+(?P<device>\w+)\s+(?P<dtype>\w+)\s+(?P<format>\S+)\s+(?P<M>\S+)\s+"
                 r"(?P<status>ok|MISMATCH|ERROR)\s")


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "metalq", "doctor", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def table_rows(text):
    """The rows of the table (up to the failure list or the summary)."""
    table = text.split("\nfailed rows:")[0]
    return [m.groupdict() for m in map(ROW.match, table.splitlines()) if m]


def run_json(capsys, *args):
    """main() in-process with --json: (exit status, the document)."""
    code = main(["doctor", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_quick_report():
    result = run_cli("--quick")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Traceback" not in result.stderr
    header = out.split("\n\n")[0]
    assert header.startswith("metalq doctor")
    for key, value in [("torch", torch.__version__), ("cpu kernels", metalq._C.cpu_kernel_isa()),
                       ("threads", f"{torch.get_num_threads()} intra-op"), ("python", sys.version.split()[0]),
                       ("built against torch", ""), ("platform", ""), ("mps", ""), ("metal library", "")]:
        line = next((line for line in header.splitlines() if line.strip().startswith(key)), None)
        assert line is not None and value in line, (key, header)
    from metalq import _build_info

    library = next(line for line in header.splitlines() if line.strip().startswith("metal library"))
    assert ("n/a" in library) == (_build_info.METAL_LIBRARY is None)
    built = next(line for line in header.splitlines() if line.strip().startswith("built against torch"))
    assert built.split()[-1] == _build_info.TORCH_VERSION
    columns = next(line for line in out.splitlines() if line.startswith("op "))
    assert columns.split() == ["op", "device", "dtype", "format", "M", "status", "err", "tol", "ms", "message"]
    rows = table_rows(out)
    devices = {"cpu", "mps"} if torch.backends.mps.is_available() else {"cpu"}
    assert {r["device"] for r in rows} == devices
    assert {r["op"] for r in rows} == set(OPS)
    assert {r["dtype"] for r in rows if r["op"].startswith(("affine", "fp"))} == {"float32", "float16", "bfloat16"}
    assert {r["format"] for r in rows if r["op"].startswith("fp")} == {"mxfp4", "nvfp4", "nvfp4+global", "mxfp8"}
    assert len({r["M"] for r in rows if r["op"] == "affine_qmm_t"}) >= 2
    assert all(r["status"] == "ok" for r in rows)
    summary = re.search(r"^(\d+) passed, (\d+) failed", out, re.M)
    assert summary and (int(summary[1]), int(summary[2])) == (len(rows), 0)


def test_json_rows_match_the_table(capsys):
    code, report = run_json(capsys, "--quick", "--device", "cpu")
    assert code == 0
    assert report["failed"] == 0 and report["passed"] == len(report["rows"]) > 0
    assert report["environment"]["torch"] == torch.__version__
    for row in report["rows"]:
        assert row["status"] == "ok" and row["ms"] >= 0
        if row["err"] is not None:
            assert 0 <= row["err"] <= row["tol"]


def test_perturbed_matmul_is_a_mismatch(capsys, monkeypatch):
    original = metalq.ops.affine_qmm_t
    monkeypatch.setattr(metalq.ops, "affine_qmm_t", lambda *args: -original(*args))
    code, report = run_json(capsys, "--quick", "--device", "cpu")
    assert code == 1
    broken = [r for r in report["rows"] if r["op"] == "affine_qmm_t"]
    assert broken and all(r["status"] == "MISMATCH" and "vs float64" in r["message"] for r in broken)
    assert all(r["err"] > r["tol"] for r in broken)
    assert all(r["status"] == "ok" for r in report["rows"] if r["op"] != "affine_qmm_t")
    assert report["failed"] == len(broken)

    assert main(["doctor", "--quick", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert [r for r in table_rows(out) if r["status"] != "ok"] == [r for r in table_rows(out)
                                                                   if r["op"] == "affine_qmm_t"]
    assert "failed rows:" in out and f"{len(broken)} failed" in out


def test_raising_op_is_an_error_row(capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("fp_dequantize exploded in the test\nsecond line of the message")

    monkeypatch.setattr(metalq.ops, "fp_dequantize", boom)
    code, report = run_json(capsys, "--quick", "--device", "cpu")
    assert code == 1
    errors = [r for r in report["rows"] if r["status"] != "ok"]
    assert errors and {r["op"] for r in errors} == {"fp_dequantize"}
    assert all(r["status"] == "ERROR" and r["message"] == "RuntimeError: fp_dequantize exploded in the test"
               for r in errors)
    assert any(r["op"] == "fp_quantize" and r["status"] == "ok" for r in report["rows"])


class OneValueOff(doctor.TorchBackend):
    """The CPU ops, with the last value of each dequantize changed by one unit in the last place."""

    def __init__(self):
        super().__init__("cpu")
        self.name = "fake"

    def affine_dequantize(self, *args):
        out = super().affine_dequantize(*args)
        last = out.view(-1)[-1:]
        last.copy_(torch.nextafter(last, torch.full_like(last, float("inf"))))
        return out


def test_a_device_must_match_the_cpu_bit_for_bit():
    # One ulp may hide within the float64 tolerance; the comparison against the CPU op must catch it.
    cpu, fake = doctor.TorchBackend("cpu"), OneValueOff()
    checks = [c for c in doctor.cases(doctor.GRIDS["quick"]) if c.op == "affine_dequantize"]
    rows = [doctor.run_case(case, fake, cpu) for case in checks]
    assert all(r.status == "MISMATCH" and r.device == "fake" for r in rows)
    assert all(f"1 of {case.N * case.K} values differ from the CPU op" in r.message for r, case in zip(rows, checks))
    assert all(doctor.run_case(case, cpu, cpu).status == "ok" for case in checks)


@pytest.mark.parametrize("args, expected", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--device", "gpu"], "invalid choice: 'gpu'"),
    (["--quick", "--full"], "not allowed with argument"),
])
def test_bad_flags(capsys, args, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", *args])
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


def test_bad_flag_on_the_command_line_has_no_traceback():
    result = run_cli("--device", "gpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "invalid choice: 'gpu'" in result.stderr.strip().splitlines()[-1]


def test_mps_requested_where_unavailable(capsys):
    if torch.backends.mps.is_available():
        pytest.skip("MPS is available here")
    assert main(["doctor", "--device", "mps"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [captured.err.strip()]
    assert "--device mps" in captured.err and "not available" in captured.err


def test_emulator_path_without_an_emulator(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("METALQ_EMULATOR_PATH", str(tmp_path))
    assert main(["doctor", "--emulator"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert f"METALQ_EMULATOR_PATH={tmp_path}" in captured.err


def test_emulator_without_clang():
    result = run_cli("--emulator", env={"METALQ_EMULATOR_PATH": str(TESTS),
                                        "METALQ_EMULATOR_CLANG": "/nonexistent/clang++-19"})
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "/nonexistent/clang++-19" in result.stderr


def test_emulator_build_error_is_a_failure(tmp_path):
    import emulator

    require(emulator.available(), f"{emulator.CLANG} (apt-get install clang-19)")
    shutil.copytree(TESTS / "emulator", tmp_path / "tests" / "emulator", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "metal").mkdir()
    (tmp_path / "metal" / "quantized.metal").write_text('#include "no_such_header.h"\n')
    result = run_cli("--quick", "--emulator", env={"METALQ_EMULATOR_PATH": str(tmp_path)})
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert "cannot build" in result.stderr and "no_such_header.h" in result.stderr


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["doctor", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--quick", "--full", "--device", "--emulator", "--json", "METALQ_EMULATOR_PATH"):
        assert flag in out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "doctor" in capsys.readouterr().out


def test_emulator_runs_the_mps_plans(capsys, monkeypatch):
    import emulator

    require(emulator.available(), f"{emulator.CLANG} (apt-get install clang-19)")
    dispatched = []
    run = emulator.Library.run
    monkeypatch.setattr(emulator.Library, "run", lambda self, plan, *a: dispatched.append(plan["kernel"])
                        or run(self, plan, *a))
    code, report = run_json(capsys, "--quick", "--emulator", "--device", "cpu")
    assert code == 0, [r for r in report["rows"] if r["status"] != "ok"]
    emulated = [r for r in report["rows"] if r["device"] == "emulator"]
    assert {r["op"] for r in emulated} == PLANNED
    on_cpu = [(r["op"], r["dtype"], r["format"], r["M"]) for r in report["rows"]
              if r["device"] == "cpu" and r["op"] in PLANNED]
    assert [(r["op"], r["dtype"], r["format"], r["M"]) for r in emulated] == on_cpu
    assert all(r["status"] == "ok" for r in emulated)
    assert len(dispatched) >= len(emulated)
    assert any(k.startswith("fp_") for k in dispatched) and any(k.startswith("affine_qmm") for k in dispatched)
    assert any(k.startswith("pack_b_") for k in dispatched) and any(k.startswith("unpack_b_") for k in dispatched)
    assert str(TESTS / "emulator") in report["environment"]["emulator"]
