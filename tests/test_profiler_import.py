"""Importing Ascend profiler CSVs (torch_npu kernel_details/op_statistic, msprof op_summary) and
fitting matmul_efficiency from them."""

import json
import shutil

import pytest

from conftest import FIXTURES, run_cli
from npusim.calibrate import write_profile
from npusim.errors import NpusimError
from npusim.profiler_import import (calibrate_from_kernels, find_profile_files, gemm_dims, load_kernels,
                                    matmul_efficiency_from_kernels, parse_dtypes, parse_shapes,
                                    read_kernel_details, read_op_statistic, read_op_summary)
from npusim.specs import load_hardware

PROF = FIXTURES / "profiler"
KD = PROF / "kernel_details.csv"
GATE_UP_FLOPS = 2 * 1024 * 4096 * 28672  # Llama-3.1-8B gate+up projection at 1024 tokens
PEAK_910B2 = 353.9


@pytest.fixture(scope="module")
def records():
    return read_kernel_details(KD)


@pytest.fixture(scope="module")
def hw():
    return load_hardware("ascend-910b2")


def test_kernel_details_rows_are_normalised(records):
    assert len(records) == 12
    qkv = records[0]
    assert (qkv.name, qkv.op_type, qkv.core_type) == ("aclnnMm_MatMulCommon_MatMulV2", "MatMulV2", "AI_CORE")
    assert qkv.start_us == pytest.approx(1717990000100.0)  # the trailing tab is dropped
    assert qkv.duration_us == pytest.approx(198.229) and qkv.wait_us == pytest.approx(1.2)
    assert qkv.block_dim == 24
    assert qkv.input_shapes == [(1024, 4096), (6144, 4096)]
    assert qkv.input_dtypes == ["bf16", "bf16"]
    assert qkv.line == 2 and qkv.file == str(KD)
    by_type = {r.op_type: r for r in records}
    assert by_type["FlashAttentionScore"].core_type == "MIX_AIC"
    assert by_type["FlashAttentionScore"].input_dtypes[-1] == "bool"
    assert by_type["RmsNorm"].input_shapes == [(1024, 4096), (4096,)]
    assert by_type["RmsNorm"].core_type == "AI_VECTOR_CORE" and by_type["RmsNorm"].block_dim == 48
    hccl = by_type["hcom_allReduce_"]
    assert hccl.core_type == "HCCL" and hccl.input_shapes == [] and hccl.input_dtypes == []


def test_block_num_and_block_dim(tmp_path):
    newer = read_kernel_details(PROF / "kernel_details_block_num.csv")
    assert [r.block_dim for r in newer] == [20, 40, 20]
    assert newer[0].op_type == "MatMulV3" and newer[0].input_shapes == [(4096, 4096), (4096, 4096)]
    # a file with neither column still reads, without block dims
    lines = (PROF / "kernel_details_block_num.csv").read_text().splitlines()
    cells = [line.split(",") for line in lines]
    col = cells[0].index("Block Num")
    stripped = tmp_path / "kernel_details.csv"
    stripped.write_text("\n".join(",".join(c[:col] + c[col + 1:]) for c in cells[:1]) + "\n")
    assert read_kernel_details(stripped) == []
    one = tmp_path / "one.csv"
    one.write_text("Name,Type,Start Time(us),Duration(us)\nk,Add,1.0,2.5\n")
    rec = read_kernel_details(one)[0]
    assert rec.block_dim is None and rec.core_type == "" and rec.duration_us == 2.5


def test_op_summary_older_column_names():
    recs = read_op_summary(PROF / "op_summary_0_1.csv")
    assert [r.op_type for r in recs] == ["MatMulV2", "Add", "SoftmaxV2"]
    mm = recs[0]
    assert mm.name == "aclnnMm_MatMulCommon_MatMulV2" and mm.core_type == "AI_CORE"
    assert mm.start_us == pytest.approx(1699999999000.25) and mm.duration_us == 260.0
    assert mm.input_dtypes == ["fp16", "fp16"] and mm.block_dim == 24
    assert recs[2].core_type == "MIX_AIV"


def test_op_statistic_agrees_with_kernel_details(records):
    stats = {s["op_type"]: s for s in read_op_statistic(PROF / "op_statistic.csv")}
    mm = stats["MatMulV2"]
    assert mm["core_type"] == "AI_CORE" and mm["count"] == 6
    kernels = [r.duration_us for r in records if r.op_type == "MatMulV2"]
    assert mm["count"] == len(kernels)
    assert mm["total_us"] == pytest.approx(sum(kernels))
    assert mm["max_us"] == pytest.approx(max(kernels)) and mm["min_us"] == pytest.approx(min(kernels))


def test_malformed_row_names_file_and_line():
    with pytest.raises(NpusimError) as e:
        read_kernel_details(PROF / "kernel_details_malformed.csv")
    assert str(e.value) == f"{PROF / 'kernel_details_malformed.csv'}:3: Duration(us) is not a number: '12.5.1'"


def test_missing_column_and_ragged_row(tmp_path):
    lines = KD.read_text().splitlines()
    header = lines[0].split(",")
    i = header.index("Duration(us)")
    no_duration = tmp_path / "kernel_details.csv"
    no_duration.write_text(",".join(header[:i] + header[i + 1:]) + "\n")
    with pytest.raises(NpusimError, match=r"kernel_details\.csv:1: missing column 'Duration\(us\)' or "
                                          r"'Task Duration\(us\)'"):
        read_kernel_details(no_duration)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("\n".join([lines[0], lines[1], lines[2] + ",extra"]) + "\n")
    with pytest.raises(NpusimError, match=r"ragged\.csv:3: expected 27 columns, got 28"):
        read_kernel_details(ragged)
    bad_shape = tmp_path / "shape.csv"
    bad_shape.write_text('Name,Type,Start Time(us),Duration(us),Input Shapes\nk,MatMulV2,1,2,"16,x;4,4"\n')
    with pytest.raises(NpusimError, match=r"shape\.csv:2: malformed shape '16,x'"):
        read_kernel_details(bad_shape)


def test_shape_and_dtype_parsing():
    assert parse_shapes('16,4096;4096,4096') == [(16, 4096), (4096, 4096)]
    assert parse_shapes("1,2;;3") == [(1, 2), (), (3,)]
    assert parse_shapes("N/A") == []
    assert parse_dtypes("DT_BF16;FLOAT16;FLOAT;INT8") == ["bf16", "fp16", "fp32", "int8"]


@pytest.mark.parametrize("shapes, mkn", [
    ([(16, 4096), (4096, 14336)], (16, 4096, 14336)),      # x @ W
    ([(16, 4096), (14336, 4096)], (16, 4096, 14336)),      # x @ W^T (Linear's stored weight)
    ([(4096, 16), (4096, 14336)], (16, 4096, 14336)),      # x^T @ W
    ([(4096, 16), (14336, 4096)], (16, 4096, 14336)),      # both transposed
    ([(16, 4096), (4096, 14336), (14336,)], (16, 4096, 14336)),  # bias ignored
    ([(8, 16, 64), (8, 64, 16)], None),                    # batched: not 2-D
    ([(16, 100), (200, 300)], None),                       # no shared dimension
])
def test_gemm_dims(shapes, mkn):
    assert gemm_dims(shapes) == mkn


def test_matmul_efficiency_from_kernels(records, hw):
    fit = matmul_efficiency_from_kernels(records, hw)
    gemms = fit["kernels"]
    assert len(gemms) == 5  # the batched and the fp32 MatMul are skipped
    assert fit["skipped"] == {"not 2-D": 1, "not fp16/bf16": 1, "zero duration": 0}
    gate_up = [g for g in gemms if g["n"] == 28672]
    assert gate_up[0]["flops"] == GATE_UP_FLOPS
    assert gate_up[0]["tflops"] == pytest.approx(GATE_UP_FLOPS / 801.727e-6 / 1e12)
    assert gate_up[0]["tflops"] == pytest.approx(300.0, abs=0.01)
    qkv = next(g for g in gemms if g["n"] == 6144)  # stored transposed: (1024,4096);(6144,4096)
    assert (qkv["m"], qkv["k"]) == (1024, 4096) and qkv["tflops"] == pytest.approx(260.0, abs=0.01)
    # predicted = CostModel._gemm: flops at 0.85 of the cube peak plus the 5 us kernel latency
    assert gate_up[0]["predicted_us"] == pytest.approx(GATE_UP_FLOPS / (PEAK_910B2 * 1e12 * 0.85) * 1e6 + 5.0)
    assert gate_up[0]["ratio"] == pytest.approx(801.727 / gate_up[0]["predicted_us"])
    decode = next(g for g in gemms if g["m"] == 16)
    assert decode["bound"] == "memory" and not decode["compute_bound"]
    # the fit: median of the compute-bound GEMMs with >= 1/4 of the largest FLOPs:
    # gate_up at 300.0 and 293.3 TFLOP/s, down_proj at 280.0 (qkv at 51 GFLOP is too small)
    assert len(fit["fit_kernels"]) == 3
    assert fit["efficiency"] == pytest.approx(GATE_UP_FLOPS / 820e-6 / (PEAK_910B2 * 1e12))
    assert fit["efficiency"] == pytest.approx(0.8288, abs=1e-4)
    merged = fit["by_shape"][0]  # the two gate_up kernels, the largest total time
    assert merged["n"] == 28672 and merged["count"] == 2
    assert merged["measured_us"] == pytest.approx((801.727 + 820.0) / 2)


def test_calibrate_from_kernels_writes_a_loadable_profile(records, hw, tmp_path):
    data = calibrate_from_kernels(hw, records)
    eff = data["matmul_efficiency"]
    assert eff["kind"] == "calibrated" and eff["value"] == pytest.approx(0.8288, abs=1e-4)
    assert str(KD) in eff["source"] and "293.3 TFLOP/s of 353.9 peak" in eff["source"]
    got = load_hardware(str(write_profile(data, tmp_path / "npu.yaml")))
    assert got.matmul_efficiency == pytest.approx(0.8288, abs=1e-4)
    assert got.provenance["matmul_efficiency"].kind == "calibrated"
    assert got.memory_efficiency == hw.memory_efficiency  # not touched by a GEMM import


def test_calibrate_from_kernels_refusals(records):
    # 293 TFLOP/s is beyond a 910B4's 245.8 cube peak: the profile does not describe this device
    with pytest.raises(NpusimError) as e:
        calibrate_from_kernels(load_hardware("ascend-910b4"), records)
    assert "ascend-910b4 is wrong for this device" in str(e.value) and "245.8" in str(e.value)
    assert "matmul efficiency 1.19 > 1" in str(e.value)
    decode_only = [r for r in records if r.input_shapes[:1] == [(16, 4096)]]
    with pytest.raises(NpusimError, match="no compute-bound fp16/bf16 2-D GEMMs among 1 GEMM kernels"):
        calibrate_from_kernels(load_hardware("ascend-910b2"), decode_only)


def _profile_tree(root, with_kernel_details=True):
    out = root / "node0_1234_20261128_ascend_pt" / "ASCEND_PROFILER_OUTPUT"
    msprof = root / "node0_1234_20261128_ascend_pt" / "PROF_000001_x" / "mindstudio_profiler_output"
    out.mkdir(parents=True)
    msprof.mkdir(parents=True)
    if with_kernel_details:
        shutil.copy(KD, out / "kernel_details.csv")
        shutil.copy(PROF / "op_statistic.csv", out / "op_statistic.csv")
    shutil.copy(PROF / "op_summary_0_1.csv", msprof / "op_summary_0_1.csv")
    return out


def test_find_profile_files_and_load_kernels(tmp_path):
    out = _profile_tree(tmp_path)
    found = find_profile_files(tmp_path)
    assert found["kernel_details"] == [out / "kernel_details.csv"]
    assert found["op_statistic"] == [out / "op_statistic.csv"]
    assert len(found["op_summary"]) == 1
    # kernel_details wins over msprof's copy of the same kernels
    recs, files = load_kernels(tmp_path)
    assert len(recs) == 12 and files == [out / "kernel_details.csv"]
    assert len(load_kernels(out)[0]) == 12  # the output folder itself
    other = tmp_path / "msprof_only"
    _profile_tree(other, with_kernel_details=False)
    recs, files = load_kernels(other)
    assert [r.op_type for r in recs] == ["MatMulV2", "Add", "SoftmaxV2"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(NpusimError, match="no kernel_details.csv or op_summary_"):
        load_kernels(tmp_path / "empty")


def test_cli_import_json_and_table(tmp_path):
    _profile_tree(tmp_path)
    rc, out, err = run_cli("calibrate", "import", "--hw", "ascend-910b2", "--profile", str(tmp_path), "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["matmul_efficiency"] == pytest.approx(0.8288, abs=1e-4)
    assert r["fitted"]["kind"] == "calibrated" and r["kernels"] == 12 and r["gemm_kernels"] == 5
    assert r["gemm_by_shape"][0]["count"] == 2
    new = tmp_path / "npu.yaml"
    rc, out, err = run_cli("calibrate", "import", "--hw", "ascend-910b2", "--profile", str(KD),
                           "--out", str(new), "--name", "my-910b2")
    assert rc == 0, err
    assert "meas/pred" in out and "0.85 -> 0.8288" in out
    assert load_hardware(str(new)).name == "my-910b2"


@pytest.mark.parametrize("args, expect", [
    (["--profile", str(PROF / "kernel_details_malformed.csv")], "kernel_details_malformed.csv:3:"),
    (["--profile", str(PROF / "nope")], "profile not found"),
    (["--hw", "ascend-910b4", "--profile", str(KD)], "ascend-910b4 is wrong for this device"),
])
def test_cli_import_errors_are_one_line(args, expect):
    if "--hw" not in args:
        args = ["--hw", "ascend-910b2", *args]
    rc, _, err = run_cli("calibrate", "import", *args)
    assert rc == 2 and err.count("\n") == 1 and expect in err
