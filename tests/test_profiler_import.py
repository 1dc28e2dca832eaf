"""Importing profiler output (torch_npu kernel_details/op_statistic, msprof op_summary, chrome
traces of torch_npu and torch.profiler on CUDA, vllm-ascend aggregates), classifying kernels, and
fitting matmul_efficiency from them. Tests marked `real` read genuine Ascend files from
../shared/data/profiles and skip without it."""

import csv
import dataclasses
import gzip
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest

from conftest import FIXTURES, run_cli
from npusim.calibrate import write_profile
from npusim.errors import NpusimError
from npusim.profiler_import import (CATEGORIES, calibrate_from_kernels, chrome_trace_tasks, classify_kernel,
                                    find_profile_files, gemm_dims, gemm_kernels, kernel_summary, load_kernels,
                                    matmul_efficiency_from_kernels, parse_dtypes, parse_shapes,
                                    read_chrome_trace, read_kernel_aggregates, read_kernel_details,
                                    read_op_statistic, read_op_summary)
from npusim.specs import load_hardware

PROF = FIXTURES / "profiler"
KD = PROF / "kernel_details.csv"
CUDA_TRACE = PROF / "cuda_trace.json"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "profiles"
real = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data/profiles is absent (real Ascend profiler files)")
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
    # what csv leaves of torch_npu's tripled quotes: one quote each side
    assert parse_shapes('"8192,4096;4096,4096"') == [(8192, 4096), (4096, 4096)]
    assert parse_shapes('""') == [] and parse_shapes('";;"') == [(), (), ()]
    assert parse_shapes('"4096;"') == [(4096,), ()]
    with pytest.raises(NpusimError, match=r"x\.csv:7: malformed shape '4,a'"):
        parse_shapes('"4,a;2"', "x.csv:7")
    assert parse_dtypes("DT_BF16;FLOAT16;FLOAT;INT8") == ["bf16", "fp16", "fp32", "int8"]
    assert parse_dtypes("DT_UNDEFINED;UNDEFINED;DOUBLE;UINT8") == ["", "", "fp64", "uint8"]


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


def test_gemm_dims_output_shape_picks_the_layout():
    # AlexNet's weight gradient: 32,4096;32,4096 -> 4096,4096 is A^T @ B, not A @ B^T (M=32)
    assert gemm_dims([(32, 4096), (32, 4096)]) == (32, 4096, 32)
    assert gemm_dims([(32, 4096), (32, 4096)], (4096, 4096)) == (4096, 32, 4096)
    assert gemm_dims([(4096, 1024), (4096, 3072)], (1024, 3072)) == (1024, 4096, 3072)
    assert gemm_dims([(1024, 4096), (6144, 4096)], (1024, 6144)) == (1024, 4096, 6144)
    assert gemm_dims([(81920, 4096), (8192, 512)], (4096, 512)) is None  # no layout gives the output
    assert gemm_dims([(16, 4096), (4096, 64)], (2, 16, 64)) == (16, 4096, 64)  # a 3-D output does not pick


def test_matmul_efficiency_from_kernels(records, hw):
    fit = matmul_efficiency_from_kernels(records, hw)
    gemms = fit["kernels"]
    assert len(gemms) == 5  # the batched and the fp32 MatMul are skipped
    assert fit["skipped"] == {"no shapes": 0, "not 2-D": 1, "shapes disagree": 0, "not fp16/bf16": 1,
                              "zero duration": 0}
    gate_up = [g for g in gemms if g["n"] == 28672]
    assert gate_up[0]["flops"] == GATE_UP_FLOPS
    assert gate_up[0]["tflops"] == pytest.approx(GATE_UP_FLOPS / 801.727e-6 / 1e12)
    assert gate_up[0]["tflops"] == pytest.approx(300.0, abs=0.01)
    qkv = next(g for g in gemms if g["n"] == 6144)  # stored transposed: (1024,4096);(6144,4096)
    assert (qkv["m"], qkv["k"]) == (1024, 4096) and qkv["tflops"] == pytest.approx(260.0, abs=0.01)
    # predicted = CostModel.gemm: flops at the profile's efficiency of the cube peak (the 5 us
    # least kernel time is far below it)
    eff = hw.matmul_efficiency
    # (plus the GEMM's fixed time beyond its roofline, the profile's gemm_fixed_us)
    assert gate_up[0]["predicted_us"] == pytest.approx(GATE_UP_FLOPS / (PEAK_910B2 * 1e12 * eff) * 1e6
                                                       + hw.gemm_fixed_us)
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
    with pytest.raises(NpusimError, match=r"no kernel_details.csv, op_summary_\*.csv or chrome trace"):
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
    assert "meas/pred" in out and f"{load_hardware('ascend-910b2').matmul_efficiency:g} -> 0.8288" in out
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


def test_kernel_details_quirks_of_real_files():
    recs = read_kernel_details(KD)
    by_type = {r.op_type: r for r in reversed(recs)}  # the first of each type
    # a quoted start time with the tab inside ("1717990000300.120\t"), as some releases write
    assert by_type["RmsNorm"].start_us == pytest.approx(1717990000300.12)
    assert by_type["MatMulV2"].output_shapes == [(1024, 6144)]
    assert by_type["FlashAttentionScore"].output_shapes[2] == ()  # ';;' is an absent output


def test_per_type_totals_are_refused_as_kernels(tmp_path):
    # op_statistic.csv passed where kernel rows are expected: say what it is, not "missing column 'Name'"
    with pytest.raises(NpusimError, match=r"op_statistic\.csv:1: per-op-type totals .* pass the kernel_details\.csv"):
        read_kernel_details(PROF / "op_statistic.csv")
    agg = tmp_path / "x_compute_ops.csv"
    agg.write_text("OP Type,category,total_duration_us,n_invocations,mean_duration_us\nMatMulV2,compute,10,2,5\n")
    with pytest.raises(NpusimError, match="per-op-type totals"):
        load_kernels(agg)
    rc, _, err = run_cli("calibrate", "import", "--hw", "ascend-910b2", "--profile", str(PROF / "op_statistic.csv"))
    assert rc == 2 and err.count("\n") == 1 and "per-op-type totals" in err


def test_read_kernel_aggregates_contracts(tmp_path):
    f = tmp_path / "a_compute_ops.csv"
    f.write_text("OP Type,category,total_duration_us,pct_of_total,n_invocations,mean_duration_us,std_duration_us\n"
                 "MatMulV2,compute,100.5,1.0,10,10.05,0.5\nSwiGlu,compute,7.0,0.1,2,3.5,0.1\n")
    rows = read_kernel_aggregates(f)
    assert [(r["op_type"], r["category"], r["count"], r["total_us"], r["mean_us"], r["std_us"], r["line"])
            for r in rows] == [("MatMulV2", "compute", 10, 100.5, 10.05, 0.5, 2), ("SwiGlu", "compute", 2, 7.0, 3.5, 0.1, 3)]
    f.write_text("OP Type,total_duration_us,n_invocations,mean_duration_us\nAdd,1.0,2.5,0.4\n")
    with pytest.raises(NpusimError, match=r"a_compute_ops\.csv:2: n_invocations must be a whole number >= 0, got '2\.5'"):
        read_kernel_aggregates(f)
    f.write_text("OP Type,total_duration_us,n_invocations,mean_duration_us\nAdd,-1.0,2,0.4\n")
    with pytest.raises(NpusimError, match=r":2: total_duration_us must be a number >= 0"):
        read_kernel_aggregates(f)
    f.write_text("scenario,total_us,compute_us\nprefill,1,1\n")  # the scenario breakdown is not per op
    with pytest.raises(NpusimError, match=r":1: missing column 'OP Type'"):
        read_kernel_aggregates(f)


@pytest.mark.parametrize("name, op_type, category", [
    # CUDA kernels
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas", "", "gemm"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "", "gemm"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_nn", "", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)", "", "gemm"),
    ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t> >(flash::Flash_fwd_params)", "", "attention"),
    ("void flash::flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4, cutlass::bfloat16_t> >(flash::Flash_fwd_params)", "", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel::Params)", "", "attention"),
    ("void vllm::paged_attention_v2_kernel<__nv_bfloat16, __nv_bfloat16, 128, 16, 128>(...)", "", "attention"),
    ("void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16, __nv_bfloat16, (vllm::Fp8KVCacheDataType)0>(...)", "", "kv_write"),
    ("void at::native::index_put_kernel_impl<at::native::OpaqueType<2> >(...)", "", "kv_write"),
    ("void vllm::rotary_embedding_kernel<c10::BFloat16, true>(long const*, c10::BFloat16*)", "", "rope"),
    ("void vllm::fused_add_rms_norm_kernel<c10::BFloat16, 8>(c10::BFloat16*, float, int, int)", "", "norm"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(int, float)", "", "norm"),
    ("void vllm::act_and_mul_kernel<c10::BFloat16, &(vllm::silu_kernel<c10::BFloat16>), true>(...)", "", "activation"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, at::detail::Array<char*, 3> >(int)", "", "elementwise"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)> >(int)", "", "copy"),
    ("Memcpy HtoD (Pinned -> Device)", "", "copy"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevComm*, unsigned long, ncclWork*)", "", "communication"),
    ("void vllm::cross_device_reduce_1stage<__nv_bfloat16, 8>(vllm::RankData*)", "", "communication"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>, unsigned int, long, 4> >(...)", "", "sampling"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float>(float*, float const*, int)", "", "sampling"),
    ("void cub::DeviceRadixSortOnesweepKernel<cub::DeviceRadixSortPolicy<float, int, int>::Policy900>(...)", "", "sampling"),
    ("void vllm::moe::topkGatingSoftmax<8, 128, 4, 16, 32, int>(float const*, bool const*)", "", "other"),
    # torch.compile: the fused op words decide
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "", "norm"),
    ("triton_poi_fused_add_mul_0", "", "elementwise"),
    ("triton_poi_fused__to_copy_3", "", "elementwise"),  # a cast, not a copy
    ("triton_poi_fused_mul_silu_1", "", "activation"),
    ("triton_poi_fused_cat_clone_2", "", "copy"),
    ("triton_tem_fused_mm_4", "", "gemm"),
    ("triton_per_fused__softmax_5", "", "sampling"),
    # Ascend: the op type decides; without it, the last word of the kernel name
    ("aclnnMm_MatMulCommon_MemSet", "MemSet", "copy"),
    ("aclnnMm_MatMulCommon_MemSet", "", "copy"),
    ("aclnnMatmul_MatMulV3Common_MatMulV5", "MatMulV3", "gemm"),
    ("aclnnFlashAttentionScore_FlashAttentionScore_FlashAttentionScore_varlen", "", "attention"),
    ("aclnnMaxPool2dWithMask_MaxPoolWithArgmaxV1AiCore_MaxPoolWithArgmaxV1", "", "other"),  # no sampling
    ("aclnnArgMax_ArgMaxV2AiCore_ArgMaxV2", "", "sampling"),
    ("aclnnArgMax_CastAiCore_Cast", "", "elementwise"),
    ("hcom_allReduce__586_0_1", "", "communication"),
    ("Cast52", "", "elementwise"),  # graph-mode names: type + index
    ("Conv2DBackpropFilter6_MemSet", "", "copy"),
    ("x", "KvRmsNormRopeCache", "kv_write"),
    ("x", "RINGMLAPrefillBF16Kernel", "attention"),
    ("x", "ScaledMaskedSoftmax", "attention"),
    ("x", "PagedCacheLoadNdKernel", "copy"),
    ("x", "DSARandomUniform", "sampling"),
    ("x", "AddRmsNormBias", "norm"),
    ("x", "_triton_rope", "rope"),
    ("x", "NonZero", "other"),
    ("cpu_property_kernel", "", "other"),  # "property" holds no rope
])
def test_classify_kernel(name, op_type, category):
    assert category in CATEGORIES
    assert classify_kernel(name, op_type) == category


# --------------------------------------------------------------------------- CUDA chrome trace fixture

def _trace_events(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def test_cuda_chrome_trace_reads_the_device_events():
    events = _trace_events(CUDA_TRACE)
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    recs, skipped = chrome_trace_tasks(CUDA_TRACE)
    assert len(recs) == len(device) == 15
    assert sum(r.duration_us for r in recs) == pytest.approx(sum(e["dur"] for e in device))
    assert skipped == {"gpu_user_annotation (GPU-lane ranges, not kernels)": 1}
    assert [r.start_us for r in recs] == sorted(r.start_us for r in recs)
    assert Counter(r.core_type for r in recs) == {"kernel": 13, "gpu_memcpy": 1, "gpu_memset": 1}
    mm = next(r for r in recs if r.name.startswith("sm90_xmma_gemm"))
    assert (mm.op, mm.op_id, mm.op_type) == ("aten::mm", 11, "")  # the launching cpu_op, by External id
    assert mm.input_shapes == [(1024, 4096), (4096, 6144)] and mm.input_dtypes == ["bf16", "bf16"]
    assert mm.duration_us == 80.0 and mm.file == str(CUDA_TRACE) and events[mm.line]["name"] == mm.name
    split_k = [r for r in recs if r.op_id == 15]
    assert [classify_kernel(r.name) for r in split_k] == ["gemm", "gemm"]
    cats = Counter(classify_kernel(r.name, r.op_type) for r in recs)
    assert cats == {"gemm": 4, "attention": 2, "copy": 2, "norm": 1, "rope": 1, "kv_write": 1, "elementwise": 1,
                    "activation": 1, "communication": 1, "sampling": 1}
    # the gzip variant holds the same trace
    gz = PROF / "cuda_trace.json.gz"
    assert read_chrome_trace(gz) == [dataclasses.replace(r, file=str(gz)) for r in recs]


def test_cuda_trace_gemms_priced_per_torch_call():
    h100 = load_hardware("h100-sxm")
    fit = matmul_efficiency_from_kernels(read_chrome_trace(CUDA_TRACE), h100)
    got = {(g["op_type"], g["m"], g["k"], g["n"]): g["measured_us"] for g in fit["kernels"]}
    # the split-K GEMM and its reduce kernel are one aten::mm call; addmm's bias comes first
    assert got == {("aten::mm", 1024, 4096, 6144): 80.0, ("aten::mm", 1024, 4096, 4096): 65.0,
                   ("aten::addmm", 1024, 4096, 14336): 170.0}
    effs = sorted(2 * 1024 * 4096 * n / (us * 1e-6) / 989e12 for (_, _, _, n), us in got.items())
    assert fit["efficiency"] == pytest.approx(effs[1]) and fit["efficiency"] == pytest.approx(0.6514, abs=1e-4)
    rc, out, err = run_cli("calibrate", "import", "--hw", "h100-sxm", "--profile", str(PROF / "cuda_trace.json.gz"), "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["kernels"] == 15 and r["gemm_kernels"] == 3 and r["matmul_efficiency"] == pytest.approx(0.6514, abs=1e-4)


def test_kernel_summary_counts_per_category_step_and_layer():
    recs = read_chrome_trace(CUDA_TRACE)
    s = kernel_summary(recs, steps=1, num_layers=1)
    assert list(s)[0] == "gemm"  # largest total time first
    assert s["gemm"]["count"] == 4 and s["gemm"]["total_us"] == pytest.approx(80 + 60 + 5 + 170)
    assert s["gemm"]["mean_us"] == pytest.approx(315 / 4)
    assert s["attention"]["types"] == {"flash::flash_fwd_splitkv_kernel": 1, "flash::flash_fwd_splitkv_combine_kernel": 1}
    assert s["copy"]["types"] == {"Memcpy HtoD": 1, "Memset": 1}
    assert sum(c["count"] for c in s.values()) == len(recs)
    two = kernel_summary(recs + recs, steps=2, num_layers=4)
    assert two["gemm"]["count"] == 8 and two["gemm"]["per_step_count"] == 4
    assert two["gemm"]["per_step_us"] == pytest.approx(315) and two["gemm"]["per_layer"] == 1.0
    assert s["gemm"]["per_layer"] == 4 and "per_layer" not in kernel_summary(recs)["gemm"]
    with pytest.raises(NpusimError, match="steps must be >= 1"):
        kernel_summary(recs, steps=0)
    with pytest.raises(NpusimError, match="num_layers must be >= 1"):
        kernel_summary(recs, num_layers=0)


def test_chrome_trace_errors_are_one_line(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text('{"traceEvents": [\n{"ph": "X", "cat": "kernel"\n')
    with pytest.raises(NpusimError, match=r"t\.json:3: malformed JSON"):
        read_chrome_trace(bad)
    bad.write_text('{"schemaVersion": 1}')
    with pytest.raises(NpusimError, match="not a chrome trace"):
        read_chrome_trace(bad)
    bad.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 1, "dur": 2}]}))
    with pytest.raises(NpusimError, match="no device kernels"):
        read_chrome_trace(bad)
    bad.write_text(json.dumps({"traceEvents": [{"ph": "M"}, 3]}))
    with pytest.raises(NpusimError, match=r"traceEvents\[1\] is not an event object: '3'"):
        read_chrome_trace(bad)
    bad.write_text(json.dumps([{"ph": "X", "cat": "kernel", "name": "k", "ts": "1.0", "dur": -2}]))
    with pytest.raises(NpusimError, match=r"traceEvents\[0\] \('k'\): 'dur' must be finite and >= 0"):
        read_chrome_trace(bad)
    bad.write_text(json.dumps([{"ph": "X", "cat": "kernel", "name": "k", "ts": "x", "dur": 2}]))
    with pytest.raises(NpusimError, match=r"traceEvents\[0\] \('k'\): 'ts' is not a number: 'x'"):
        read_chrome_trace(bad)
    cut = tmp_path / "t.json.gz"
    cut.write_bytes((PROF / "cuda_trace.json.gz").read_bytes()[:500])
    with pytest.raises(NpusimError, match=r"t\.json\.gz: cannot read"):
        read_chrome_trace(cut)
    rc, _, err = run_cli("calibrate", "import", "--hw", "h100-sxm", "--profile", str(cut))
    assert rc == 2 and err.count("\n") == 1 and "cannot read" in err


def test_cpu_only_trace_folder_and_traces_without_shapes(tmp_path):
    # a folder with only a chrome trace reads it; a trace without record_shapes prices nothing
    events = [e for e in _trace_events(CUDA_TRACE) if e.get("cat") != "cpu_op"]
    (tmp_path / "run").mkdir()
    trace = tmp_path / "run" / "host_1.pt.trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    recs, files = load_kernels(tmp_path)
    assert files == [trace] and len(recs) == 15 and all(r.op == "" and r.input_shapes == [] for r in recs)
    with pytest.raises(NpusimError, match=r"has 4 GEMM kernels but no GEMM shapes"):
        matmul_efficiency_from_kernels(recs, load_hardware("h100-sxm"))


# --------------------------------------------------------------------------- real Ascend files

KERNEL_DETAILS = ["qwen3-0.6b-pretrain-910b-rank0", "llm-train-910b-excerpt", "gpt3-tp8-train-910b-excerpt",
                  "alexnet-train-910b-level1-rank0"]


def _csv_rows(path):
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


@real
@pytest.mark.parametrize("folder", KERNEL_DETAILS)
def test_real_kernel_details_read_every_row(folder):
    path = SHARED / folder / "kernel_details.csv"
    rows = _csv_rows(path)
    recs = read_kernel_details(path)
    assert len(recs) == len(rows) > 0
    assert all(math.isfinite(r.duration_us) and r.duration_us > 0 for r in recs)
    assert all(r.start_us > 1.6e15 for r in recs)  # µs since the epoch, tabs and quotes gone
    assert [r.name for r in recs] == [row["Name"] for row in rows]
    assert sum(r.duration_us for r in recs) == pytest.approx(sum(float(row["Duration(us)"]) for row in rows))
    for r, row in zip(recs, rows):  # every shape cell parsed to as many inputs as it lists
        cell = row["Input Shapes"].strip('"')
        assert len(r.input_shapes) == (0 if cell in ("", "N/A") else cell.count(";") + 1)


@real
def test_real_qwen3_pretrain_kernels():
    recs = read_kernel_details(SHARED / "qwen3-0.6b-pretrain-910b-rank0" / "kernel_details.csv")
    row = next(r for r in recs if r.line == 36)  # the gate_up projection of one layer
    assert (row.op_type, row.core_type, row.block_dim) == ("MatMulV3", "AI_CORE", 20)
    assert row.input_shapes == [(4096, 1024), (6144, 1024)] and row.output_shapes == [(4096, 6144)]
    assert row.input_dtypes == ["bf16", "bf16"] and row.duration_us == pytest.approx(239.34)
    assert row.start_us == pytest.approx(1764246877084452.04, abs=0.5)
    assert gemm_dims(row.input_shapes, row.output_shapes[0]) == (4096, 1024, 6144)
    cats = {r.op_type: classify_kernel(r.name, r.op_type) for r in recs}
    assert {t: cats[t] for t in ("MatMulV3", "MatMulV2", "FlashAttentionScore", "FlashAttentionScoreGrad",
                                 "RmsNorm", "RotaryPositionEmbedding", "SwiGlu", "hcom_allReduce_", "TensorMove")} == {
        "MatMulV3": "gemm", "MatMulV2": "gemm", "FlashAttentionScore": "attention", "FlashAttentionScoreGrad": "attention",
        "RmsNorm": "norm", "RotaryPositionEmbedding": "rope", "SwiGlu": "activation",
        "hcom_allReduce_": "communication", "TensorMove": "copy"}
    # 28 layers' worth of forward and backward kernels in this step of the pipeline stage
    s = kernel_summary(recs)
    assert s["attention"]["types"] == {"FlashAttentionScore": 28, "FlashAttentionScoreGrad": 28}
    assert s["rope"]["count"] == 112 and s["norm"]["types"]["RmsNorm"] == 112
    # the cube kernels of a 20-AI-core part: 910B3, whose bf16 cube peak they stay under
    assert {r.block_dim for r in recs if r.core_type in ("AI_CORE", "MIX_AIC")} == {20}
    fit = matmul_efficiency_from_kernels(recs, load_hardware("ascend-910b3"))
    assert len(fit["kernels"]) == 336 and sum(fit["skipped"].values()) == 0
    assert 0.5 < fit["efficiency"] < 0.8


@real
def test_real_gpt3_kernels_and_cube_counters():
    path = SHARED / "gpt3-tp8-train-910b-excerpt" / "kernel_details.csv"
    recs = read_kernel_details(path)
    rows = _csv_rows(path)
    mm = next(r for r in recs if r.line == 35)
    assert (mm.name, mm.op_type, mm.block_dim, mm.input_dtypes) == ("MatMul91", "MatMul", 24, ["fp16", "fp16"])
    assert mm.start_us == pytest.approx(1699529623118495.2)  # no tab in this release
    m, k, n = gemm_dims(mm.input_shapes, mm.output_shapes[0])
    assert (m, k, n) == (4096, 12288, 4608)
    # the PMU counter of cube FLOPs reads 1-3.3% above 2*M*K*N for every 2-D GEMM of the file (it
    # varies between calls of one shape); a wrong layout would be off by a factor of 3 or more
    for r, row in zip(recs, rows):
        if r.op_type == "MatMul":
            dims = gemm_dims(r.input_shapes, r.output_shapes[0])
            assert 1.0 <= float(row["aic_cube_fops"]) / (2 * math.prod(dims)) <= 1.04, (r.line, dims)
    memset = next(r for r in recs if r.op_type == "MemSet" and r.core_type == "AI_VECTOR_CORE")
    assert memset.input_shapes == [] and memset.input_dtypes == [""]  # """""" and UNDEFINED
    hccl = next(r for r in recs if r.core_type == "HCCL")
    assert hccl.block_dim == 0 and hccl.input_shapes == [] and classify_kernel(hccl.name, hccl.op_type) == "communication"
    assert classify_kernel("x", "ScaledMaskedSoftmax") == "attention" and classify_kernel("x", "FastGelu") == "activation"
    # 24-block GEMMs at 311 TFLOP/s: not a 910B3 (294.9 peak), but fits a 910B2 (353.9)
    with pytest.raises(NpusimError, match=r"ascend-910b3 is wrong for this device.*310\.9 TFLOP/s"):
        calibrate_from_kernels(load_hardware("ascend-910b3"), recs)
    fit = matmul_efficiency_from_kernels(recs, load_hardware("ascend-910b2"))
    assert fit["skipped"]["not 2-D"] == 4 and len(fit["kernels"]) == 9  # the BatchMatMuls are 3-D
    assert fit["efficiency"] == pytest.approx(310.9 / 353.9, abs=0.005)


@real
def test_real_llm_train_excerpt_shapes_disagree_with_outputs():
    recs = read_kernel_details(SHARED / "llm-train-910b-excerpt" / "kernel_details.csv")
    first = recs[0]
    assert first.start_us == pytest.approx(1736413971558972.912, abs=0.5)  # quoted, with its tab
    assert first.input_shapes == [(81920, 4096), (8192, 512)] and first.output_shapes == [(4096, 512)]
    fa = next(r for r in recs if r.op_type == "FlashAttentionScore")
    assert fa.input_shapes[:3] == [(4096, 2, 512)] * 3 and fa.input_shapes[3] == () and len(fa.input_dtypes) == 12
    assert {classify_kernel(r.name, r.op_type) for r in recs} == {"gemm", "attention", "elementwise"}
    # the excerpt's GEMM rows were cut from a run: their K does not match in any layout
    _, skipped = gemm_kernels(recs, load_hardware("ascend-910b3"))
    assert skipped["shapes disagree"] == 12
    with pytest.raises(NpusimError, match=r"no fp16/bf16 2-D GEMMs to price among the 12 matmul kernels .*\(12 shapes disagree\)"):
        matmul_efficiency_from_kernels(recs, load_hardware("ascend-910b3"))


@real
def test_real_alexnet_kernels_statistics_and_trace_agree():
    folder = SHARED / "alexnet-train-910b-level1-rank0"
    recs = read_kernel_details(folder / "kernel_details.csv")
    wgrad = next(r for r in recs if r.line == 86)
    assert wgrad.input_shapes == [(32, 4096), (32, 4096)] and wgrad.output_shapes == [(4096, 4096)]
    assert gemm_dims(wgrad.input_shapes, wgrad.output_shapes[0]) == (4096, 32, 4096)
    # op_statistic.csv (no Device_id column in this release) sums the same kernels, less HCCL's
    stats = read_op_statistic(folder / "op_statistic.csv")
    compute = [r for r in recs if r.core_type != "HCCL"]
    assert len(recs) == 191 and sum(s["count"] for s in stats) == len(compute) == 187
    by_type = Counter(r.op_type for r in compute)
    assert set(by_type) == {s["op_type"] for s in stats}
    for s in stats:
        assert s["count"] == by_type[s["op_type"]]
        assert s["total_us"] == pytest.approx(sum(r.duration_us for r in recs if r.op_type == s["op_type"]), abs=0.01)
        assert s["total_us"] == pytest.approx(s["count"] * s["avg_us"], abs=s["count"] * 0.001 + 0.01)
        assert s["min_us"] <= s["avg_us"] <= s["max_us"]
    # trace_view.json of the same step: the same compute kernels, and the collectives once each
    trace, skipped = chrome_trace_tasks(folder / "trace_view.json")
    compute = [r for r in trace if r.core_type not in ("HCCL", "PCIE_DMA_SQE", "SDMA_SQE")]
    assert Counter(r.name for r in compute) == Counter(r.name for r in recs if r.core_type != "HCCL")
    assert sum(r.duration_us for r in compute) == pytest.approx(
        sum(r.duration_us for r in recs if r.core_type != "HCCL"), abs=0.05)
    assert [(r.name, r.op_type, round(r.duration_us, 2)) for r in trace if r.core_type == "HCCL"] == [
        (r.name, r.op_type, round(r.duration_us, 2)) for r in recs if r.core_type == "HCCL"]
    assert {r.name for r in trace if r.core_type in ("PCIE_DMA_SQE", "SDMA_SQE")} == {"MEMCPY_ASYNC"}
    events = _trace_events(folder / "trace_view.json")
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "process_name"}
    on_hw = sum(e.get("ph") == "X" and procs.get(e["pid"]) == "Ascend Hardware" for e in events)
    on_hccl = sum(e.get("ph") == "X" and procs.get(e["pid"]) == "HCCL" for e in events)
    assert on_hw == len(trace) - 4 + skipped["stream events and HCCL steps (Ascend Hardware)"]
    assert on_hccl == 4 + skipped["HCCL plane tasks (steps of the collectives counted)"]
    # FP32 GEMMs: nothing npusim prices
    with pytest.raises(NpusimError, match=r"no fp16/bf16 2-D GEMMs to price among the 9 matmul kernels .*\(9 not fp16/bf16\)"):
        matmul_efficiency_from_kernels(recs, load_hardware("ascend-910b3"))


@real
def test_real_trace_view_excerpt():
    path = SHARED / "trace-view-excerpt-910b" / "trace_view.json"
    events = _trace_events(path)
    hw = [e for e in events if e.get("ph") == "X" and e["pid"] == 800]  # the "Ascend Hardware" process
    recs = read_chrome_trace(path)
    assert len(recs) == len(hw) == 276  # this older release names no stream-event tasks
    assert sum(r.duration_us for r in recs) == pytest.approx(sum(e["dur"] for e in hw))
    assert Counter(r.core_type for r in recs) == {"Other": 274, "AI_CPU": 2}
    assert all(r.op_type == "" and r.input_shapes == [] for r in recs)
    mm = [r for r in recs if r.name == "aclnnMm_MatMulCommon_MatMulV2"]
    assert len(mm) == 6 and {classify_kernel(r.name) for r in mm} == {"gemm"}
    assert classify_kernel("aclnnAddmm_MatMulCommon_MemSet") == "copy"


@real
def test_real_op_statistic_totals():
    stats = read_op_statistic(SHARED / "qwen3-0.6b-pretrain-910b-rank0" / "op_statistic.csv")
    assert len(stats) == len(_csv_rows(SHARED / "qwen3-0.6b-pretrain-910b-rank0" / "op_statistic.csv")) == 35
    for s in stats:  # Avg Time is cut, not rounded, to 3 decimals (Add: 14646.74 / 457 -> 32.049)
        assert s["total_us"] == pytest.approx(s["count"] * s["avg_us"], abs=s["count"] * 0.001 + 0.01)
        assert s["min_us"] <= s["avg_us"] <= s["max_us"]
    assert sum(s["ratio_pct"] for s in stats) == pytest.approx(100, abs=0.05)
    mm = next(s for s in stats if s["op_type"] == "MatMulV3")
    assert (mm["core_type"], mm["count"]) == ("AI_CORE", 280)


# every vllm-ascend op type npusim has no category for, and why
AGGREGATE_OTHER = {"MoeGatingTopK"}  # MoE routing: not in npusim's dense cost model


@real
@pytest.mark.parametrize("name", ["qwen332b_compute_ops.csv", "dsv3_compute_ops.csv", "qwen332b_comm_ops.csv",
                                  "dsv3_comm_ops.csv"])
def test_real_vllm_ascend_aggregates_classify(name):
    path = SHARED / "vllm-ascend-eager-a3-aggregates" / name
    rows = read_kernel_aggregates(path)
    assert len(rows) == len(_csv_rows(path))
    for r in rows:
        assert r["total_us"] == pytest.approx(r["count"] * r["mean_us"], rel=1e-9)
        cat = classify_kernel(r["op_type"], r["op_type"])
        assert (cat == "other") == (r["op_type"] in AGGREGATE_OTHER), (r["op_type"], cat)


@real
def test_real_vllm_ascend_known_kernels_land_in_their_categories():
    folder = SHARED / "vllm-ascend-eager-a3-aggregates"
    cats = {r["op_type"]: classify_kernel(r["op_type"], r["op_type"])
            for f in sorted(folder.glob("*_ops.csv")) for r in read_kernel_aggregates(f)}
    assert len(cats) == 44  # distinct op types of the two models, compute and comm
    expected = {"MatMulV2": "gemm", "QuantBatchMatmulV3": "gemm", "TransposeBatchMatMul": "gemm",
                "FusedInferAttentionScore": "attention", "RINGMLAPrefillBF16Kernel": "attention",
                "RmsNorm": "norm", "AddRmsNormBias": "norm", "_triton_rope": "rope", "InterleaveRope": "rope",
                "SwiGlu": "activation", "ReshapeAndCacheNdKernel": "kv_write", "KvRmsNormRopeCache": "kv_write",
                "hcom_allReduce_": "communication", "allgatherAicpuKernel": "communication",
                "ArgMaxV2": "sampling", "ApplyTopKTopPCustom": "sampling", "Slice": "copy", "Cast": "elementwise",
                "DynamicQuant": "elementwise"}
    assert {t: cats[t] for t in expected} == expected


@real
def test_real_qwen32b_layer_kernel_counts():
    # Qwen3-32B (64 layers) eager decode/prefill: per layer one attention, one rope, one cache write,
    # one SwiGlu and two norms per attention call
    rows = {r["op_type"]: r for r in read_kernel_aggregates(SHARED / "vllm-ascend-eager-a3-aggregates" / "qwen332b_compute_ops.csv")}
    attn = rows["FusedInferAttentionScore"]["count"]
    for t in ("_triton_rope", "ReshapeAndCacheNdKernel", "SwiGlu"):
        assert rows[t]["count"] == attn
    assert rows["AddRmsNormBias"]["count"] == 2 * attn


@real
@pytest.mark.parametrize("target, rc, needle", [
    ("qwen3-0.6b-pretrain-910b-rank0", 0, "matmul_efficiency: 0.85 ->"),
    ("gpt3-tp8-train-910b-excerpt", 2, "ascend-910b3 is wrong for this device"),
    ("llm-train-910b-excerpt", 2, "12 shapes disagree"),
    ("alexnet-train-910b-level1-rank0", 2, "9 not fp16/bf16"),
    ("alexnet-train-910b-level1-rank0/trace_view.json", 2, "no GEMM shapes"),
    ("trace-view-excerpt-910b", 2, "no GEMM shapes"),
    ("qwen3-0.6b-pretrain-910b-rank0/op_statistic.csv", 2, "per-op-type totals"),
    ("vllm-ascend-eager-a3-aggregates", 2, "no kernel_details.csv, op_summary_*.csv or chrome trace"),
])
def test_real_cli_import(target, rc, needle):
    got, out, err = run_cli("calibrate", "import", "--hw", "ascend-910b3", "--profile", str(SHARED / target))
    assert got == rc, err
    if rc == 0:
        assert needle in out and "MatMulV3" in out
    else:
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_nothing_to_price_says_why(tmp_path):
    hw = load_hardware("ascend-910b2")
    f = tmp_path / "kernel_details.csv"
    f.write_text('Name,Type,Start Time(us),Duration(us),Input Shapes,Input Data Types,Output Shapes\n'
                 'Add1,Add,1.0\t,2.5,"""4,4;4,4""",FLOAT16;FLOAT16,"""4,4"""\n')
    with pytest.raises(NpusimError, match=r"no GEMM kernels among the 1 kernels of .*kernel_details\.csv: nothing to price"):
        matmul_efficiency_from_kernels(read_kernel_details(f), hw)
    f.write_text('Name,Type,Start Time(us),Duration(us),Input Shapes,Input Data Types,Output Shapes\n'
                 'Conv2D1,Conv2D,1.0\t,300,"""32,1,224,224,8;121,4,16,8;64""",FLOAT16;FLOAT16;FLOAT16,"""32,8,55,55,8"""\n')
    with pytest.raises(NpusimError, match=r"none of the 1 GEMM kernels of .* is a 2-D matmul npusim prices \(Conv2D\)"):
        matmul_efficiency_from_kernels(read_kernel_details(f), hw)
    rc, _, err = run_cli("calibrate", "import", "--hw", "ascend-910b2", "--profile", str(f))
    assert rc == 2 and err.count("\n") == 1 and "is a 2-D matmul npusim prices" in err
