"""Specs a user writes: hardware, model, engine settings. Validated pydantic models, loaded from YAML/JSON.

Hardware profiles keep every number with its provenance: in the YAML each number is a mapping
``{value: ..., kind: datasheet|derived|third-party|calibrated|assumed, source: "..."}``. The loaded
``HardwareSpec`` holds plain floats (the cost model reads them on its hot path) and a ``provenance``
dict with the kind and source of each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from npusim.errors import NpusimError

DTYPE_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5,
                                  "w8a8": 1.0}
# int8 and int4: weight-only (dequantised to 16 bits before the matrix units); w8a8: int8 weights
# and int8 activations on the int8 matrix units (vllm-ascend's --quantization ascend W8A8,
# SmoothQuant-style W8A8 on GPUs); fp8: W8A8 on FP8 tensor cores where the device has them
WEIGHT_DTYPES = ("bf16", "fp16", "fp8", "int8", "int4", "w8a8")
KV_DTYPES = ("bf16", "fp16", "fp8", "int8")

REPO_ROOT = Path(__file__).resolve().parent.parent
HW_PROFILE_DIR = REPO_ROOT / "hw_profiles"


# --------------------------------------------------------------------------- errors, file loading

_RULE_WORDS = {
    "greater_than": ("must be >", "gt"),
    "greater_than_equal": ("must be >=", "ge"),
    "less_than": ("must be <", "lt"),
    "less_than_equal": ("must be <=", "le"),
}


def describe_validation_error(exc: ValidationError, where: str = "") -> str:
    """One line naming the field and the rule, e.g. "memory_bandwidth_gbs must be > 0, got -5"."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "value"
    kind = err["type"]
    got = err.get("input")
    if kind in _RULE_WORDS:
        words, key = _RULE_WORDS[kind]
        bound = err["ctx"][key]
        bound = f"{bound:g}" if isinstance(bound, (int, float)) else bound
        text = f"{field} {words} {bound}, got {got!r}"
    elif kind == "missing":
        text = f"{field} is required"
    elif kind == "extra_forbidden":
        text = f"unknown field {field!r}"
    elif kind == "value_error":  # a rule across fields: its message says it all
        msg = err["msg"].removeprefix("Value error, ")
        text = f"{field}: {msg}" if err["loc"] else msg
    else:
        text = f"{field}: {err['msg'][0].lower()}{err['msg'][1:]}, got {got!r}"
    more = len(exc.errors()) - 1
    if more:
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return f"{where}: {text}" if where else text


# libyaml's loader when PyYAML has it: ten times faster than the pure-Python one (profiles load at
# every command's start)
_BASE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _YAML_LOADER(_BASE_LOADER):  # noqa: N801
    """Refuses a key given twice in one mapping (YAML would keep the last silently)."""


def _unique_mapping(loader, node):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=True)


_YAML_LOADER.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_text_file(path: Path) -> str:
    """A file's UTF-8 text; unreadable or non-UTF-8 files are one error naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise NpusimError(f"{path} is a folder, not a file") from None
    except OSError as e:
        raise NpusimError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise NpusimError(f"{path}: line {line}: not UTF-8 text (byte 0x{e.object[e.start]:02x})") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} given twice")
        out[k] = v
    return out


def read_json_file(path: Path) -> Any:
    """A JSON file's content; malformed files (or a key given twice in one object) name the file."""
    text = read_text_file(path)
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as e:
        raise NpusimError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from None
    except ValueError as e:
        raise NpusimError(f"{path}: malformed JSON: {e}") from None


def load_mapping(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON file holding one mapping; malformed files name the file and line."""
    if path.suffix == ".json":
        data = read_json_file(path)
        if not isinstance(data, dict):
            raise NpusimError(f"{path}: expected a mapping of fields at the top level")
        return data
    text = read_text_file(path)
    try:
        data = yaml.load(text, Loader=_YAML_LOADER)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise NpusimError(f"{path}: malformed YAML{line}: {problem}") from None
    if not isinstance(data, dict):
        raise NpusimError(f"{path}: expected a mapping of fields at the top level")
    return data


def _validate(cls: type[BaseModel], data: dict, where: str) -> Any:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise NpusimError(describe_validation_error(e, where)) from None


# --------------------------------------------------------------------------- hardware

class Provenance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["datasheet", "derived", "third-party", "calibrated", "assumed"]
    source: str = Field(min_length=3)


class CalibrationTransfer(BaseModel):
    """Where a device's measured tables come from when it was not measured itself."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_profile: str = Field(alias="from", min_length=1)
    kind: Literal["derived"] = "derived"
    source: str = Field(min_length=3)


class BlockSizeRule(BaseModel):
    """Which KV page sizes (tokens) the device's paged-attention kernels accept."""

    model_config = ConfigDict(extra="forbid")
    multiple_of: int = Field(default=1, ge=1)
    min: int = Field(default=1, ge=1)
    max: int = Field(ge=1)
    allowed: list[int] | None = None  # an explicit list overrides multiple_of/min/max
    recommended: int = Field(ge=1)
    source: str = Field(min_length=3)

    @model_validator(mode="after")
    def _check(self) -> "BlockSizeRule":
        if self.allowed is not None:
            if not self.allowed or any(b < 1 for b in self.allowed):
                raise ValueError(f"kv_block_sizes.allowed must list page sizes >= 1, got {self.allowed}")
        elif self.min > self.max:
            raise ValueError(f"kv_block_sizes: min {self.min} is above max {self.max}")
        if not self.accepts(self.recommended):
            raise ValueError(f"kv_block_sizes.recommended {self.recommended} is not one the rule accepts "
                             f"({self.describe()})")
        return self

    def accepts(self, block_size: int) -> bool:
        if self.allowed is not None:
            return block_size in self.allowed
        return self.min <= block_size <= self.max and block_size % self.multiple_of == 0

    def describe(self) -> str:
        if self.allowed is not None:
            return ", ".join(str(b) for b in self.allowed)
        return f"multiples of {self.multiple_of} from {self.min} to {self.max}"


class HardwareSpec(BaseModel):
    """One device. Throughputs are dense peaks; efficiencies say how much of them kernels reach."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str
    vendor: str
    description: str = ""
    # compute
    ai_cores: int = Field(gt=0, description="cube/AI cores (Ascend) or SMs (NVIDIA)")
    vector_cores: int = Field(gt=0)
    clock_ghz: float = Field(gt=0)
    matmul_tflops_fp16: float = Field(gt=0)
    matmul_tflops_bf16: float = Field(gt=0)
    matmul_tflops_int8: float = Field(gt=0)
    # dense FP8 matrix throughput (Hopper's FP8 tensor cores); None: no FP8 matrix unit, FP8
    # weights run weight-only (dequantised to 16 bits before the cube, as vLLM's FP8 Marlin)
    matmul_tflops_fp8: float | None = Field(default=None, gt=0)
    vector_tflops: float = Field(gt=0, description="fp16 elementwise/vector throughput")
    # memory
    memory_gib: float = Field(gt=0)
    memory_bandwidth_gbs: float = Field(gt=0)
    per_core_bandwidth_gbs: float = Field(gt=0, description="what one core can pull; caps a partition")
    l2_mib: float = Field(gt=0)
    core_buffer_kib: float = Field(gt=0, description="largest per-core on-chip buffer (L1 / shared mem)")
    # links
    host_link_gbs: float = Field(gt=0, description="host <-> device bandwidth, used by KV swap")
    chip_link_gbs: float = Field(gt=0, description="aggregate chip-to-chip bandwidth")
    # The node the device sits in, for tensor parallelism: how many devices share the fabric, and
    # what one device sends into it (one way), with the fabric's per-step latency and the share of
    # the link bandwidth collectives reach.
    node_devices: int = Field(gt=0, description="devices in one node on the fabric below")
    link_gbs: float = Field(gt=0, description="one-way bandwidth of one device into the node fabric")
    link_latency_us: float = Field(ge=0, description="latency of one step of a collective")
    link_efficiency: float = Field(gt=0, le=1, description="share of link_gbs a collective reaches")
    link_topology: Literal["full-mesh", "switch", "ring"] = Field(
        description="full-mesh (HCCS) or switch (NVSwitch, PCIe switch): a collective in 2 steps; ring: 2(N-1)")
    # Between nodes (RoCE, InfiniBand), what one device sends one way and the latency of a message:
    # a pipeline's stages may sit on different nodes. None: the profile knows no such link.
    internode_link_gbs: float | None = Field(default=None, gt=0, description="one-way bandwidth between nodes, per device")
    internode_latency_us: float | None = Field(default=None, ge=0, description="latency of one message between nodes")
    # power
    tdp_w: float = Field(gt=0)
    idle_w: float = Field(gt=0)
    # fixed costs
    kernel_latency_us: float = Field(ge=0, description="least device time of one small dependent kernel")
    runtime_reserve_gib: float = Field(ge=0, description="runtime/driver/workspace memory outside the KV pool")
    # roofline efficiencies (fractions of peak)
    matmul_efficiency: float = Field(gt=0, le=1)
    vector_efficiency: float = Field(gt=0, le=1)
    memory_efficiency: float = Field(gt=0, le=1, description="share of streaming_gbs (HBM, or the cores' pull) kernels reach")
    # Measured on the device where a profile has no calibration tables: what a GEMM kernel takes
    # beyond its roofline (the intercept of decode GEMM times against their bytes: filling and
    # draining the cube pipeline), and the share of the matmul peak causal flash attention reaches
    # in prefill (None: the GEMM rate, matmul_efficiency). Optional: a profile without them has
    # neither term; given, each needs its source like every other number.
    gemm_fixed_us: float = Field(default=0.0, ge=0, description="GEMM time beyond its roofline")
    # the same for a W8A8 GEMM (int8 x int8 with the scales' dequantisation in its epilogue);
    # None: gemm_fixed_us
    int8_gemm_fixed_us: float | None = Field(default=None, ge=0, description="W8A8 GEMM time beyond its roofline")
    flash_attention_efficiency: float | None = Field(
        default=None, gt=0, le=1, description="share of the matmul peak causal prefill attention reaches")
    matmul_tile_m: int = Field(gt=0, description="hardware MMA tile rows")
    matmul_tile_n: int = Field(gt=0)
    matmul_tile_k: int = Field(gt=0)
    default_engine: str = Field(min_length=1, description="engine profile used when none is named")
    # measured kernel times (`npusim calibrate run`) the cost model interpolates; relative paths
    # are relative to the profile's folder. None: the datasheet roofline with its efficiencies.
    calibration_files: list[str] = Field(default_factory=list)
    # Another device's measured tables carried here (a device of the same die, not measured itself):
    # each measured kernel keeps what it took beyond its datasheet roofline and adds the change of
    # roofline between the two devices (npusim.calibration.transfer_rows).
    calibration_transfer: CalibrationTransfer | None = None
    # filled in on loading: the source device's peaks and streaming efficiency the transfer uses
    transfer_from: dict[str, float] | None = None
    provenance: dict[str, Provenance]

    @model_validator(mode="after")
    def _check(self) -> "HardwareSpec":
        if self.calibration_transfer is not None and self.calibration_files and self.transfer_from is None:
            raise ValueError("calibration_files and calibration_transfer exclude each other: a device's own "
                             "measurements or another's carried over")
        if self.idle_w >= self.tdp_w:
            raise ValueError(f"idle_w ({self.idle_w}) must be below tdp_w ({self.tdp_w})")
        missing = [f for f in NUMBER_FIELDS if f not in self.provenance
                   and (f not in OPTIONAL_NUMBER_FIELDS or f in self.model_fields_set)]
        if missing:
            raise ValueError(f"no source given for {', '.join(missing)}")
        if (self.internode_link_gbs is None) != (self.internode_latency_us is None):
            raise ValueError("internode_link_gbs and internode_latency_us come together (the link between nodes)")
        return self

    @property
    def streaming_gbs(self) -> float:
        """What the device can stream from HBM: its bandwidth, or what its cores can pull (each
        at most per_core_bandwidth_gbs: a 20-core 910B3 at 32 B a cycle a core reaches 1.15 of
        its 1.6 TB/s), whichever is less. memory_efficiency is the share of this kernels reach."""
        return min(self.memory_bandwidth_gbs, self.ai_cores * self.per_core_bandwidth_gbs)

    def matmul_tflops(self, dtype: str) -> float:
        if dtype == "fp8" and self.matmul_tflops_fp8 is not None:
            return self.matmul_tflops_fp8  # W8A8 FP8: weights and activations on the FP8 units
        if dtype == "w8a8" and self.matmul_tflops_int8 is not None:
            return self.matmul_tflops_int8  # int8 weights and activations on the int8 units
        if dtype in ("fp8", "int8", "int4", "w8a8"):
            # weight-only quantisation dequantises to 16-bit before the cube/tensor core
            return self.matmul_tflops_bf16
        return self.matmul_tflops_fp16 if dtype == "fp16" else self.matmul_tflops_bf16

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30

    def peaks(self) -> dict[str, float]:
        """The datasheet rooflines a carried table is scaled by (calibration.transfer_of)."""
        return {"memory_bandwidth_gbs": self.memory_bandwidth_gbs, "matmul_tflops_bf16": self.matmul_tflops_bf16,
                "matmul_tflops_fp8": self.matmul_tflops("fp8"), "matmul_tflops_int8": self.matmul_tflops_int8}

    def without_tables(self) -> "HardwareSpec":
        """This device priced from its datasheet roofline alone (no measured or carried tables)."""
        return self.model_copy(update={"calibration_files": [], "calibration_transfer": None, "transfer_from": None})

    def partition(self, cores: int, memory_fraction: float) -> "HardwareSpec":
        """A spatial share (vNPU): `cores` AI cores, their share of compute, the bandwidth they can pull."""
        if not 0 < cores <= self.ai_cores:
            raise NpusimError(f"cores must be in 1..{self.ai_cores} for {self.name}, got {cores}")
        if not 0 < memory_fraction <= 1:
            raise NpusimError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
        if cores == self.ai_cores and memory_fraction == 1:
            return self  # the whole device is not a partition: no per-core bandwidth cap applies
        f = cores / self.ai_cores
        # Partitions run at once and share HBM: each gets at most its cores' share of the device
        # bandwidth, and no more than its cores can pull.
        bw = min(self.memory_bandwidth_gbs * f, cores * self.per_core_bandwidth_gbs)
        return self.model_copy(update={
            "name": f"{self.name}[{cores}c]",
            # measured on the whole device: a partition has its roofline
            "calibration_files": [], "calibration_transfer": None, "transfer_from": None,
            "ai_cores": cores,
            "vector_cores": max(1, round(self.vector_cores * f)),
            "matmul_tflops_fp16": self.matmul_tflops_fp16 * f,
            "matmul_tflops_bf16": self.matmul_tflops_bf16 * f,
            "matmul_tflops_int8": self.matmul_tflops_int8 * f,
            "matmul_tflops_fp8": self.matmul_tflops_fp8 * f if self.matmul_tflops_fp8 is not None else None,
            "vector_tflops": self.vector_tflops * f,
            "memory_gib": self.memory_gib * memory_fraction,
            "memory_bandwidth_gbs": bw,
            "l2_mib": self.l2_mib * f,
        })


# numbers a profile may leave out (their defaults add nothing); given, they need a source too
OPTIONAL_NUMBER_FIELDS = ("gemm_fixed_us", "int8_gemm_fixed_us", "flash_attention_efficiency", "matmul_tflops_fp8",
                          "internode_link_gbs", "internode_latency_us")
NUMBER_FIELDS = tuple(
    name for name, info in HardwareSpec.model_fields.items()
    if info.annotation in (int, float) or name in OPTIONAL_NUMBER_FIELDS
)


def _split_number(val: Any, key: str, where: str) -> tuple[Any, dict[str, Any]]:
    """A profile's `{value, kind, source}` number as (value, its provenance)."""
    if not isinstance(val, dict) or "value" not in val:
        raise NpusimError(f"{where}: {key} must be a mapping {{value, kind, source}}, got {val!r}")
    extra = set(val) - {"value", "kind", "source"}
    if extra:
        raise NpusimError(f"{where}: {key} has unknown keys {sorted(extra)}")
    if isinstance(val["value"], bool):
        raise NpusimError(f"{where}: {key} must be a number, got {val['value']!r}")
    return val["value"], {k: v for k, v in val.items() if k != "value"}


def _no_given_provenance(data: dict[str, Any], where: str) -> None:
    if "provenance" in data:
        raise NpusimError(f"{where}: provenance is built from each number's kind and source; do not give it")


def hardware_from_mapping(data: dict[str, Any], where: str) -> HardwareSpec:
    """Split `{value, kind, source}` numbers into plain values and provenance, then validate."""
    if "ai_cores" not in data and {"kernels", "execution"} <= set(data):
        raise NpusimError(f"{where} is an engine profile, not a hardware profile (give it to --engine)")
    _no_given_provenance(data, where)
    if "transfer_from" in data:
        raise NpusimError(f"{where}: transfer_from is filled in from calibration_transfer's profile; do not give it")
    flat: dict[str, Any] = {}
    provenance: dict[str, Any] = {}
    for key, val in data.items():
        if key in NUMBER_FIELDS:
            flat[key], provenance[key] = _split_number(val, key, where)
        else:
            flat[key] = val
    flat["provenance"] = provenance
    return _validate(HardwareSpec, flat, where)


def known_hardware() -> list[str]:
    return sorted(p.stem for p in HW_PROFILE_DIR.glob("*.yaml"))


def _resolve(name_or_path: str | Path, directory: Path, what: str) -> Path | None:
    if not str(name_or_path).strip():
        raise NpusimError(f"the {what} name is empty")
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml", ".json"):
        if not p.exists():
            raise NpusimError(f"{what} file not found: {p}")
        return p
    candidate = directory / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    if p.is_dir():
        raise NpusimError(f"{what} {p} is a folder: give a name or a .yaml file")
    return None


def _cached(load):
    """Memoise a profile loader by file and modification time: profiles are read, never changed."""
    cache: dict[tuple[str, float], Any] = {}

    def wrapper(path: Path):
        key = (str(path.resolve()), path.stat().st_mtime)
        if key not in cache:
            cache[key] = load(path)
        return cache[key]
    return wrapper


def _profile_path(name_or_path: str | Path, directory: Path, kind: str, known) -> Path:
    """The file of a profile given by name (in `directory`) or by path; an unknown name lists the known."""
    path = _resolve(name_or_path, directory, f"{kind} profile")
    if path is None:
        raise NpusimError(f"unknown {kind} {str(name_or_path)!r}; known: {', '.join(known())} "
                          f"(or give a path to a .yaml profile)")
    return path


def load_hardware(name_or_path: str | Path) -> HardwareSpec:
    """A profile by name (``ascend-910b2``) or by path to a YAML/JSON file."""
    if isinstance(name_or_path, HardwareSpec):
        return name_or_path
    return _load_hardware_file(_profile_path(name_or_path, HW_PROFILE_DIR, "hardware", known_hardware))


@_cached
def _load_hardware_file(path: Path) -> HardwareSpec:
    hw = hardware_from_mapping(load_mapping(path), str(path))
    t = hw.calibration_transfer
    if t is not None:
        where = f"{path}: calibration_transfer.from"
        # a name, or a path relative to this profile's folder (as calibration_files are)
        given = Path(t.from_profile)
        is_path = given.suffix in (".yaml", ".yml", ".json") or "/" in t.from_profile
        if is_path and not given.is_absolute():
            given = path.parent / given
        try:
            src_path = _profile_path(given if is_path else t.from_profile, HW_PROFILE_DIR, "hardware",
                                     known_hardware)
            if src_path.resolve() == path.resolve() or "calibration_transfer" in load_mapping(src_path):
                raise NpusimError(f"{t.from_profile}'s tables are carried from another device themselves "
                                  f"(or it is this profile): name the measured one")
            src = load_hardware(src_path)
        except NpusimError as e:
            raise NpusimError(f"{where}: {e}") from None
        if not src.calibration_files:
            raise NpusimError(f"{where}: {t.from_profile} has no calibration_files to carry")
        if is_path:  # (kept absolute, so a profile written elsewhere still finds it)
            t = t.model_copy(update={"from_profile": str(src_path.resolve())})
        return hw.model_copy(update={"calibration_files": list(src.calibration_files), "calibration_transfer": t,
                                     "transfer_from": {**src.peaks(), "memory_efficiency": src.memory_efficiency}})
    files = []
    for name in hw.calibration_files:
        cal = Path(name)
        if not cal.is_absolute():
            cal = path.parent / cal
        if not cal.exists():
            raise NpusimError(f"{path}: calibration_files: {name} not found")
        files.append(str(cal))
    return hw.model_copy(update={"calibration_files": files}) if files else hw


# --------------------------------------------------------------------------- engine profiles

ENGINE_PROFILE_DIR = HW_PROFILE_DIR / "engines"

# The ops npusim prices, per layer and once per iteration; an engine profile says how many device
# kernels each launches (0: fused into a neighbour, which does its work).
LAYER_OPS = ("rmsnorm_attn", "qkv_proj", "qkv_bias", "qk_norm", "rope", "kv_cache_write",
             "attention_decode", "attention_prefill", "o_proj", "residual_attn", "rmsnorm_mlp",
             "gate_up_proj", "silu_mul", "down_proj", "residual_mlp")
STEP_OPS = ("embedding", "final_norm", "lm_head", "sampling")
# Ops of some models only, and the kernels each launches where a profile does not say. MLA
# (DeepSeek): the up-projection of the compressed q, decode's two batched GEMMs that absorb the
# latent's up-projections into q and out of the output, prefill's up-projection of the latent to
# K and V. MoE: the router (score GEMM, softmax, top-k, the tokens sorted by expert) and the
# combine (each token's expert outputs weighted and summed back into its row).
# least kernel times an engine may give beyond its ops': MLA's decode attention (one latent for
# all heads) is a kernel of other costs than GQA's, under the same op
FLOOR_ONLY_KEYS = ("attention_decode_mla",)
# act_quant: the kernels quantising a linear layer's input to int8 under w8a8, per quantised GEMM
# (one: in real vllm-ascend W8A8 profiles of DeepSeek-V3, DynamicQuant 8662 + AscendQuantV2 6954
# invocations = QuantBatchMatmulV3's 15616, Horacehxw/msModeling docs/perf_database/reports/
# profiling_analysis_eager/dsv3_compute_ops.csv @39df672)
MODEL_OP_KERNELS = {"q_b_proj": 1, "mla_absorb": 2, "kv_b_proj": 1, "moe_router": 3, "moe_combine": 1,
                    "act_quant": 1}


class EngineProfile(BaseModel):
    """How one serving implementation turns a model into kernels, and what its host does.

    Device costs (rates, bandwidth, the least time a kernel takes) belong to the hardware profile;
    an engine profile holds what the implementation decides: how many kernels each op launches, how
    they are launched (captured graphs, eager dispatch), which KV page sizes its attention kernels
    take, and the host time around them."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str
    description: str = ""
    execution: Literal["graph", "eager", "piecewise"]
    attention_backend: str = Field(min_length=2, description="the attention kernels, in words")
    kv_block_sizes: BlockSizeRule
    kernels: dict[str, int]  # op -> kernels it launches (per layer for LAYER_OPS, per step for STEP_OPS)
    decode_kv_passes: float = Field(ge=1, description="times decode attention moves each KV byte: 1 in place, 3 for a gather copy")
    # the measured decode attention kernel of the calibration file this engine runs ("sdpa_dense",
    # "gather_sdpa", "flex_paged"); None: the roofline with decode_kv_passes
    decode_attention_impl: str | None = None
    # the same for MLA models (absorbed decode over the latent: "mla_gather_bmm"); None: roofline
    mla_decode_attention_impl: str | None = None
    # least device time of one kernel of an op in this implementation on the device it was traced
    # on (a strided elementwise kernel costs more than the device's least kernel); default: the
    # hardware's kernel_latency_us
    kernel_floor_us: dict[str, float] = Field(default_factory=dict)
    # the kernel chain of the device's calibration that times this engine's RMSNorm kernels (its
    # least time grows with the row width): "rms_norm" for PyTorch's F.rms_norm; None: not timed
    norm_kernel: str | None = None
    # the engine's own scheduler and memory defaults (SCHEDULER_DEFAULTS), each with its source;
    # devices of at least large_memory_gib (but those named in large_memory_exclude) get the
    # large_memory_* values, as vLLM does
    scheduler_defaults: dict[str, float]
    large_memory_exclude: list[str] = Field(default_factory=list)
    # host terms, seconds as named
    host_per_iteration_ms: float = Field(ge=0, description="scheduler and input preparation per iteration")
    host_per_sequence_us: float = Field(ge=0, description="sampling, detokenisation, output processing per sequence")
    dispatch_per_kernel_us: float = Field(ge=0, description="CPU time to launch one kernel eagerly")
    graph_launch_us: float = Field(ge=0, description="CPU time to replay one captured graph")
    # CPU time per attention layer to refresh a replayed whole graph's captured attention task with
    # this step's sequence lengths (vllm-ascend: the tiling of its attention ops is computed on the
    # host, so every full-graph step re-issues each layer's task into the graph). It runs while
    # the graph replays; each layer's attention waits for its own refresh. None: no refresh (CUDA
    # graphs read the lengths from device memory).
    graph_update_per_layer_us: float | None = Field(default=None, ge=0)
    # Which steps a graph engine replays from captured graphs (vLLM's cudagraph_mode): "full", every
    # step one graph; "full_and_piecewise" (vLLM's default), decode-only steps one graph and other
    # steps piecewise (captured pieces between eagerly launched attention); "full_decode_only",
    # decode-only steps one graph and the others eager. Steps of more tokens than were captured
    # run eagerly in either vLLM mode.
    # ("piecewise" and "none", vLLM's other modes, for a profile calibrated on such a server)
    graph_mode: Literal["full", "full_and_piecewise", "full_decode_only", "piecewise", "none"] = "full"
    # the largest captured step, in tokens: min(max_num_seqs x capture_tokens_per_seq,
    # max_capture_tokens) as vLLM sizes it where the user sets none (vLLM modes only)
    max_capture_tokens: int | None = Field(default=None, gt=0)
    capture_tokens_per_seq: int | None = Field(default=None, gt=0)
    # the activation-quantisation kernels of w8a8 (and fp8) GEMMs as this implementation runs them
    # on the device its profiles came from: fixed cost of a dense layer's (static) and of the
    # experts' (dynamic, per token) quantisation, and the rate they stream their bytes at; None:
    # a kernel's least time and the device's streaming rate
    act_quant_fixed_us: float | None = Field(default=None, ge=0)
    act_quant_moe_fixed_us: float | None = Field(default=None, ge=0)
    act_quant_gbs: float | None = Field(default=None, gt=0)
    provenance: dict[str, Provenance]

    @model_validator(mode="after")
    def _check(self) -> "EngineProfile":
        unknown = sorted(set(self.kernels) - set(LAYER_OPS) - set(STEP_OPS) - set(MODEL_OP_KERNELS))
        if unknown:
            raise ValueError(f"kernels: unknown op(s) {', '.join(unknown)}; known: "
                             f"{', '.join(LAYER_OPS + STEP_OPS + tuple(MODEL_OP_KERNELS))}")
        missing = [o for o in LAYER_OPS + STEP_OPS if o not in self.kernels]
        if missing:
            raise ValueError(f"kernels: no count given for {', '.join(missing)} (0 if fused)")
        bad = [f"{o} = {n}" for o, n in self.kernels.items() if n < 0]
        if bad:
            raise ValueError(f"kernels must be >= 0, got {', '.join(bad)}")
        unknown = sorted(set(self.kernel_floor_us) - set(LAYER_OPS) - set(STEP_OPS) - set(MODEL_OP_KERNELS)
                         - set(FLOOR_ONLY_KEYS))
        if unknown:
            raise ValueError(f"kernel_floor_us: unknown op(s) {', '.join(unknown)}")
        bad = [f"{o} = {v}" for o, v in self.kernel_floor_us.items() if not v > 0]
        if bad:
            raise ValueError(f"kernel_floor_us must be > 0, got {', '.join(bad)}")
        if (self.max_capture_tokens is None) != (self.capture_tokens_per_seq is None):
            raise ValueError("max_capture_tokens and capture_tokens_per_seq go together (the largest step "
                             "a vLLM engine captures): give both or neither")
        if self.graph_mode != "full" and self.max_capture_tokens is None:
            raise ValueError(f"graph_mode {self.graph_mode} needs max_capture_tokens and capture_tokens_per_seq "
                             "(the largest step it captures)")
        if self.max_capture_tokens is not None and self.execution != "graph":
            raise ValueError(f"graph_mode, max_capture_tokens and capture_tokens_per_seq are for execution: "
                             f"graph (this profile: {self.execution})")
        d = self.scheduler_defaults
        unknown = sorted(set(d) - set(SCHEDULER_DEFAULTS) - set(LARGE_MEMORY_DEFAULTS))
        missing = [k for k in SCHEDULER_DEFAULTS if k not in d]
        if unknown or missing:
            raise ValueError("scheduler_defaults: " + (f"unknown {', '.join(unknown)}" if unknown else
                                                         f"no value for {', '.join(missing)}"))
        if "large_memory_gib" in d and not all(k in d for k in LARGE_MEMORY_DEFAULTS):
            raise ValueError(f"scheduler_defaults: large_memory_gib needs {', '.join(LARGE_MEMORY_DEFAULTS)}")
        if d["max_num_batched_tokens"] < d["max_num_seqs"]:
            raise ValueError("scheduler_defaults: max_num_batched_tokens must be >= max_num_seqs")
        for k in ("max_num_seqs", "max_num_batched_tokens", "large_memory_max_num_seqs",
                  "large_memory_max_num_batched_tokens"):
            if k in d and (d[k] != int(d[k]) or d[k] < 1):
                raise ValueError(f"scheduler_defaults.{k} must be a whole number >= 1, got {d[k]:g}")
        if not 0 < d["gpu_memory_utilization"] <= 1:
            raise ValueError(f"scheduler_defaults.gpu_memory_utilization must be in (0, 1], got "
                             f"{d['gpu_memory_utilization']:g}")
        if not 0 <= d["watermark"] < 1:
            raise ValueError(f"scheduler_defaults.watermark must be in [0, 1), got {d['watermark']:g}")
        if d["enable_prefix_caching"] not in (0, 1):
            raise ValueError(f"scheduler_defaults.enable_prefix_caching must be 0 or 1, got "
                             f"{d['enable_prefix_caching']:g}")
        need = [f for f in ENGINE_NUMBER_FIELDS if f not in self.provenance and getattr(self, f) is not None]
        need += [f"kernels.{o}" for o in self.kernels if f"kernels.{o}" not in self.provenance]
        need += [f"kernel_floor_us.{o}" for o in self.kernel_floor_us
                 if f"kernel_floor_us.{o}" not in self.provenance]
        need += [f"scheduler_defaults.{k}" for k in self.scheduler_defaults
                 if f"scheduler_defaults.{k}" not in self.provenance]
        if need:
            raise ValueError(f"no source given for {', '.join(need)}")
        return self

    def kernels_per_layer(self, ops: tuple[str, ...] = LAYER_OPS) -> int:
        return sum(self.kernels[o] for o in ops)


# what an engine decides for the user who does not (its defaults), and for large-memory devices
SCHEDULER_DEFAULTS = ("max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "watermark",
                      "enable_prefix_caching")
LARGE_MEMORY_DEFAULTS = ("large_memory_gib", "large_memory_max_num_seqs", "large_memory_max_num_batched_tokens")

ENGINE_NUMBER_FIELDS = ("decode_kv_passes", "host_per_iteration_ms", "host_per_sequence_us",
                        "dispatch_per_kernel_us", "graph_launch_us", "graph_update_per_layer_us",
                        "max_capture_tokens", "capture_tokens_per_seq",
                        "act_quant_fixed_us", "act_quant_moe_fixed_us", "act_quant_gbs")


def engine_profile_from_mapping(data: dict[str, Any], where: str) -> EngineProfile:
    """Split `{value, kind, source}` numbers (the host terms and each op's kernel count) into
    values and provenance, then validate."""
    if "kernels" not in data and {"ai_cores", "memory_gib"} <= set(data):
        raise NpusimError(f"{where} is a hardware profile, not an engine profile (give it to --hw)")
    _no_given_provenance(data, where)
    flat: dict[str, Any] = {}
    provenance: dict[str, Any] = {}
    for key, val in data.items():
        if key in ENGINE_NUMBER_FIELDS:
            flat[key], provenance[key] = _split_number(val, key, where)
        elif key in ("kernels", "kernel_floor_us", "scheduler_defaults"):
            if not isinstance(val, dict):
                raise NpusimError(f"{where}: {key} must be a mapping of op -> {{value, kind, source}}")
            flat[key] = {}
            for op, item in val.items():
                flat[key][op], provenance[f"{key}.{op}"] = _split_number(item, f"{key}.{op}", where)
        else:
            flat[key] = val
    flat["provenance"] = provenance
    return _validate(EngineProfile, flat, where)


def known_engines() -> list[str]:
    return sorted(p.stem for p in ENGINE_PROFILE_DIR.glob("*.yaml"))


def load_engine_profile(name_or_path: str | Path) -> EngineProfile:
    """An engine profile by name (``vllm``) or by path to a YAML/JSON file."""
    if isinstance(name_or_path, EngineProfile):
        return name_or_path
    return _load_engine_file(_profile_path(name_or_path, ENGINE_PROFILE_DIR, "engine", known_engines))


@_cached
def _load_engine_file(path: Path) -> EngineProfile:
    return engine_profile_from_mapping(load_mapping(path), str(path))


# --------------------------------------------------------------------------- models

class ModelSpec(BaseModel):
    """A decoder-only transformer with SwiGLU MLPs, RMSNorm and RoPE: dense (Llama, Mistral, Qwen),
    mixture-of-experts (Qwen3-MoE, Mixtral, DeepSeek) and with multi-head latent attention (MLA,
    DeepSeek-V2/V3)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)  # MLA: 1, the latent every head reads
    head_dim: int = Field(gt=0)  # of each head's query and key (MLA: the no-RoPE and RoPE parts together)
    intermediate_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head of q and k
    max_position_embeddings: int = Field(gt=0)
    source: str = Field(min_length=3)
    # Mixture of experts: num_experts routed experts of moe_intermediate_size, experts_per_token of
    # them per token, chosen by a router; num_shared_experts more of that size that every token
    # goes through; num_dense_layers layers keep a dense MLP of intermediate_size (DeepSeek's first
    # first_k_dense_replace, Qwen3-MoE's mlp_only_layers; where they sit does not change the cost).
    # num_experts 0: every MLP is dense.
    num_experts: int = Field(default=0, ge=0)
    experts_per_token: int = Field(default=0, ge=0)
    moe_intermediate_size: int = Field(default=0, ge=0)
    num_shared_experts: int = Field(default=0, ge=0)
    num_dense_layers: int = Field(default=0, ge=0)
    # Multi-head latent attention (kv_lora_rank > 0): each token caches one latent of kv_lora_rank
    # values and a shared RoPE key of qk_rope_head_dim; queries come from a rank-q_lora_rank
    # compression (0: straight from the hidden state); values have v_head_dim per head.
    kv_lora_rank: int = Field(default=0, ge=0)
    q_lora_rank: int = Field(default=0, ge=0)
    qk_rope_head_dim: int = Field(default=0, ge=0)
    v_head_dim: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "ModelSpec":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.num_experts and not (0 < self.experts_per_token <= self.num_experts and self.moe_intermediate_size):
            raise ValueError(f"an MoE model needs 1 <= experts_per_token <= num_experts ({self.num_experts}) "
                             f"and moe_intermediate_size > 0")
        if not self.num_experts and (self.experts_per_token or self.moe_intermediate_size
                                     or self.num_shared_experts or self.num_dense_layers):
            raise ValueError("experts_per_token, moe_intermediate_size, num_shared_experts and num_dense_layers "
                             "need num_experts > 0")
        if self.num_dense_layers >= self.num_layers:
            raise ValueError(f"num_dense_layers ({self.num_dense_layers}) must be below num_layers "
                             f"({self.num_layers}): an MoE model has at least one MoE layer")
        mla = (self.kv_lora_rank, self.qk_rope_head_dim, self.v_head_dim)
        if any(mla) or self.q_lora_rank:
            if not all(mla):
                raise ValueError("multi-head latent attention needs kv_lora_rank, qk_rope_head_dim and "
                                 "v_head_dim all > 0")
            if self.num_kv_heads != 1:
                raise ValueError(f"an MLA model has one latent KV head (num_kv_heads 1), got {self.num_kv_heads}")
            if self.head_dim <= self.qk_rope_head_dim:
                raise ValueError(f"head_dim ({self.head_dim}) is the no-RoPE and RoPE parts of a query head "
                                 f"together: it must exceed qk_rope_head_dim ({self.qk_rope_head_dim})")
            if self.qkv_bias or self.qk_norm:
                raise ValueError("qkv_bias and qk_norm are GQA options; an MLA model has neither")
        return self

    # Layers and attention -----------------------------------------------------------------------
    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers if self.num_experts else 0

    @property
    def num_dense_mlp_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of each of K and V per token per layer (MLA: the latent and the RoPE key, cached once)."""
        if self.mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.num_kv_heads * self.head_dim

    @property
    def kv_values_per_token_layer(self) -> int:
        """Values one token caches per layer: K and V of each KV head; MLA: one latent and one RoPE
        key (DeepSeek-V3: 512 + 64 = 576)."""
        return self.kv_dim if self.mla else 2 * self.kv_dim

    @property
    def o_dim(self) -> int:
        """Width of the attention output the o_proj reads."""
        return self.num_heads * self.v_head_dim if self.mla else self.q_dim

    @property
    def attn_params_per_layer(self) -> int:
        h = self.hidden_size
        if not self.mla:
            return h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h
        ql, c = self.q_lora_rank, self.kv_lora_rank
        q = h * ql + ql * self.q_dim if ql else h * self.q_dim  # q_a + q_b, or q_proj
        kv_a = h * (c + self.qk_rope_head_dim)  # the latent and the shared RoPE key
        nope = self.head_dim - self.qk_rope_head_dim
        kv_b = c * self.num_heads * (nope + self.v_head_dim)  # latent -> each head's K (no RoPE) and V
        return q + kv_a + kv_b + self.o_dim * h

    # MLPs ----------------------------------------------------------------------------------------
    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def moe_mlp_params(self) -> int:
        """One MoE layer's MLP: every routed expert, the shared experts and the router."""
        h, fe = self.hidden_size, self.moe_intermediate_size
        return (self.num_experts + self.num_shared_experts) * 3 * h * fe + h * self.num_experts

    @property
    def mlp_params_per_layer(self) -> int:
        """The MLP's weights in an MoE layer (every expert's and the router's), else the dense SwiGLU's."""
        return self.moe_mlp_params if self.num_experts else self.dense_mlp_params

    @property
    def active_params(self) -> int:
        """Parameters one token uses: all but the experts it is not routed to."""
        idle = (self.num_experts - self.experts_per_token) * 3 * self.hidden_size * self.moe_intermediate_size
        return self.num_params - self.num_moe_layers * idle

    @property
    def mlp_act_width(self) -> int:
        """The widest intermediate activations per token: a dense MLP's, or an MoE layer's routed
        and shared experts' together."""
        moe = (self.experts_per_token + self.num_shared_experts) * self.moe_intermediate_size
        if not self.num_experts:
            return self.intermediate_size
        return max(moe, self.intermediate_size if self.num_dense_layers else 0)

    # Parameter counts -------------------------------------------------------------------------
    @property
    def linear_params_per_layer(self) -> int:
        """Linear weights of one layer (of an MoE layer, in a model that mixes dense and MoE layers)."""
        return self.attn_params_per_layer + self.mlp_params_per_layer

    @property
    def linear_params(self) -> int:
        return (self.num_layers * self.attn_params_per_layer + self.num_moe_layers * self.moe_mlp_params
                + self.num_dense_mlp_layers * self.dense_mlp_params)

    @property
    def other_params_per_layer(self) -> int:
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        qk_norm = 2 * self.head_dim if self.qk_norm else 0
        latent_norms = self.q_lora_rank + self.kv_lora_rank  # MLA: RMSNorms on the compressed q and kv
        return 2 * self.hidden_size + bias + qk_norm + latent_norms  # two RMSNorm weights, and the q/k norms

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        layers = self.linear_params + self.num_layers * self.other_params_per_layer
        return layers + self.embedding_params + self.lm_head_params + self.hidden_size

    def weight_bytes(self, weight_dtype: str = "bf16") -> float:
        """Weights in memory. Weight-only int8/int4 quantise the linear layers; embeddings, the LM
        head and norms stay 16-bit (as in common W8A16/W4A16 recipes). int8 carries per-channel
        scales, int4 one 16-bit scale per group of 128."""
        wb = dtype_bytes(weight_dtype, WEIGHT_DTYPES, "weight_dtype")
        linear = self.linear_params
        if weight_dtype == "int4":
            wb += 2.0 / 128
        rest = self.num_params - linear
        scales = 0.0
        if weight_dtype in ("int8", "w8a8"):  # one 16-bit scale per output channel
            scales = 2.0 * self.linear_output_channels
        return linear * wb + rest * 2.0 + scales

    @property
    def linear_output_channels(self) -> int:
        """Output channels of every linear layer (what per-channel quantisation scales)."""
        h, fe = self.hidden_size, self.moe_intermediate_size
        if self.mla:
            ql, nope = self.q_lora_rank, self.head_dim - self.qk_rope_head_dim
            attn = (ql + self.q_dim if ql else self.q_dim) + self.kv_dim + self.num_heads * (nope + self.v_head_dim) + h
        else:
            attn = self.q_dim + 2 * self.kv_dim + h
        moe = (self.num_experts + self.num_shared_experts) * (2 * fe + h)
        dense = 2 * self.intermediate_size + h
        return self.num_layers * attn + self.num_moe_layers * moe + self.num_dense_mlp_layers * dense

    def kv_bytes_per_token(self, kv_dtype: str = "bf16") -> float:
        return self.num_layers * self.kv_values_per_token_layer * dtype_bytes(kv_dtype, KV_DTYPES, "kv_dtype")


def dtype_bytes(dtype: str, allowed: tuple[str, ...], field: str) -> float:
    if dtype not in allowed:
        raise NpusimError(f"{field} must be one of {', '.join(allowed)}, got {dtype!r}")
    return DTYPE_BYTES[dtype]


_HF = "Hugging Face config.json of "
MODEL_ZOO: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(num_layers=16, hidden_size=2048, num_heads=32, num_kv_heads=8, head_dim=64,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, source=_HF + "meta-llama/Llama-3.2-1B"),
    "llama-3.2-3b": dict(num_layers=28, hidden_size=3072, num_heads=24, num_kv_heads=8, head_dim=128,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, source=_HF + "meta-llama/Llama-3.2-3B"),
    "llama-3.1-8b": dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                         intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
                         source=_HF + "meta-llama/Llama-3.1-8B"),
    "llama-3.1-70b": dict(num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8, head_dim=128,
                          intermediate_size=28672, vocab_size=128256, max_position_embeddings=131072,
                          source=_HF + "meta-llama/Llama-3.1-70B"),
    "llama-2-7b": dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, head_dim=128,
                       intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
                       source=_HF + "meta-llama/Llama-2-7b-hf"),
    "llama-2-13b": dict(num_layers=40, hidden_size=5120, num_heads=40, num_kv_heads=40, head_dim=128,
                        intermediate_size=13824, vocab_size=32000, max_position_embeddings=4096,
                        source=_HF + "meta-llama/Llama-2-13b-hf"),
    "qwen2.5-0.5b": dict(num_layers=24, hidden_size=896, num_heads=14, num_kv_heads=2, head_dim=64,
                         intermediate_size=4864, vocab_size=151936, qkv_bias=True, tie_word_embeddings=True,
                         max_position_embeddings=32768, source=_HF + "Qwen/Qwen2.5-0.5B"),
    "qwen2.5-7b": dict(num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4, head_dim=128,
                       intermediate_size=18944, vocab_size=152064, qkv_bias=True,
                       max_position_embeddings=32768, source=_HF + "Qwen/Qwen2.5-7B"),
    "qwen3-8b": dict(num_layers=36, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                     intermediate_size=12288, vocab_size=151936, qk_norm=True,
                     max_position_embeddings=40960, source=_HF + "Qwen/Qwen3-8B"),
    "qwen3-4b": dict(num_layers=36, hidden_size=2560, num_heads=32, num_kv_heads=8, head_dim=128,
                     intermediate_size=9728, vocab_size=151936, qk_norm=True, tie_word_embeddings=True,
                     max_position_embeddings=40960, source=_HF + "Qwen/Qwen3-4B"),
    "qwen3-14b": dict(num_layers=40, hidden_size=5120, num_heads=40, num_kv_heads=8, head_dim=128,
                      intermediate_size=17408, vocab_size=151936, qk_norm=True,
                      max_position_embeddings=40960, source=_HF + "Qwen/Qwen3-14B"),
    # Mixture of experts: every layer routes each token to experts_per_token of num_experts.
    "qwen3-30b-a3b": dict(num_layers=48, hidden_size=2048, num_heads=32, num_kv_heads=4, head_dim=128,
                          intermediate_size=6144, vocab_size=151936, qk_norm=True, num_experts=128,
                          experts_per_token=8, moe_intermediate_size=768, max_position_embeddings=40960,
                          source=_HF + "Qwen/Qwen3-30B-A3B"),
    "qwen3-235b-a22b": dict(num_layers=94, hidden_size=4096, num_heads=64, num_kv_heads=4, head_dim=128,
                            intermediate_size=12288, vocab_size=151936, qk_norm=True, num_experts=128,
                            experts_per_token=8, moe_intermediate_size=1536, max_position_embeddings=40960,
                            source=_HF + "Qwen/Qwen3-235B-A22B"),
    "mixtral-8x7b": dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                         intermediate_size=14336, vocab_size=32000, num_experts=8, experts_per_token=2,
                         moe_intermediate_size=14336, max_position_embeddings=32768,
                         source=_HF + "mistralai/Mixtral-8x7B-v0.1"),
    # DeepSeek: multi-head latent attention, shared experts, the first layers dense (first_k_dense_replace)
    "deepseek-v3": dict(num_layers=61, hidden_size=7168, num_heads=128, num_kv_heads=1, head_dim=192,
                        intermediate_size=18432, vocab_size=129280, num_experts=256, experts_per_token=8,
                        moe_intermediate_size=2048, num_shared_experts=1, num_dense_layers=3,
                        kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
                        max_position_embeddings=163840, source=_HF + "deepseek-ai/DeepSeek-V3"),
    "deepseek-v2-lite": dict(num_layers=27, hidden_size=2048, num_heads=16, num_kv_heads=1, head_dim=192,
                             intermediate_size=10944, vocab_size=102400, num_experts=64, experts_per_token=6,
                             moe_intermediate_size=1408, num_shared_experts=2, num_dense_layers=1,
                             kv_lora_rank=512, qk_rope_head_dim=64, v_head_dim=128,
                             max_position_embeddings=163840, source=_HF + "deepseek-ai/DeepSeek-V2-Lite"),
    "qwen3-32b": dict(num_layers=64, hidden_size=5120, num_heads=64, num_kv_heads=8, head_dim=128,
                      intermediate_size=25600, vocab_size=151936, qk_norm=True,
                      max_position_embeddings=40960, source=_HF + "Qwen/Qwen3-32B"),
}

def tp_shard(model: ModelSpec, tp: int) -> ModelSpec:
    """What one of `tp` devices holds of `model` under tensor parallelism as Megatron and vLLM
    split it: the attention heads and the MLP's intermediate dimension divided, the KV heads
    divided (or, with more devices than KV heads, one replicated on each), the vocabulary of the
    embedding and the LM head divided (padded up). The hidden size is whole on every device."""
    if tp == 1:
        return model
    if model.num_heads % tp:
        raise NpusimError(f"--tp {tp}: {model.name}'s {model.num_heads} attention heads do not divide "
                          f"among {tp} devices")
    kv = model.num_kv_heads
    if kv >= tp and kv % tp:
        raise NpusimError(f"--tp {tp}: {model.name}'s {kv} KV heads do not divide among {tp} devices")
    if kv < tp and tp % kv:
        raise NpusimError(f"--tp {tp}: {tp} devices cannot replicate {model.name}'s {kv} KV heads evenly")
    dense_mlp = not model.num_experts or model.num_dense_layers > 0
    if dense_mlp and model.intermediate_size % tp:
        raise NpusimError(f"--tp {tp}: {model.name}'s intermediate size {model.intermediate_size} does not "
                          f"divide among {tp} devices")
    if model.moe_intermediate_size % tp:
        raise NpusimError(f"--tp {tp}: {model.name}'s expert size {model.moe_intermediate_size} does not "
                          f"divide among {tp} devices")
    # Each expert (shared ones too) is split as a dense MLP is: vLLM's TP for MoE. MLA: the heads
    # divide, the compressions of q and kv (and so the latent cache) are whole on every device.
    return model.model_copy(update={
        "name": f"{model.name}[tp{tp}]", "num_heads": model.num_heads // tp, "num_kv_heads": max(1, kv // tp),
        # (an all-MoE model has no dense MLP: its intermediate_size prices nothing)
        "intermediate_size": model.intermediate_size // tp if dense_mlp else model.intermediate_size,
        "vocab_size": ceil_div(model.vocab_size, tp), "moe_intermediate_size": model.moe_intermediate_size // tp})


def ep_shard(model: ModelSpec, ranks: int, ep: int | None = None) -> ModelSpec:
    """What one device of one of `ranks` data-parallel ranks holds when the experts spread over all
    of them, `ep` devices in all (DeepSeek's layout: attention data-parallel, each rank whole
    attention, or its tp_shard, and its own sequences' KV; E/ep routed experts a device). Held as
    tp_shard holds experts, split `ranks` ways more (the same bytes and per-expert work as E/ep
    whole ones; the cost model prices them whole); the shared experts stay as the rank holds them:
    `ranks` times as many of 1/ranks the size."""
    if ranks == 1:
        return model
    if model.moe_intermediate_size % ranks:
        tp = (ep or ranks) // ranks
        per = f" (its size on each of --tp {tp} devices)" if tp > 1 else ""
        raise NpusimError(f"--ep {ep or ranks}: {model.name}'s expert size {model.moe_intermediate_size}{per} does "
                          f"not divide among {ranks} ranks")
    return model.model_copy(update={
        "name": f"{model.name}[ep{ep or ranks}]", "moe_intermediate_size": model.moe_intermediate_size // ranks,
        "num_shared_experts": model.num_shared_experts * ranks})


def pp_layers(num_layers: int, pp: int) -> list[int]:
    """Layers of each of `pp` pipeline stages as vLLM splits them (get_pp_indices): equal shares,
    the remainder one more each on the stages just before the last (which holds the LM head)."""
    if pp > num_layers:
        raise NpusimError(f"--pp {pp} exceeds the {num_layers} layers of the model: a stage needs a layer")
    parts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        parts[-i] += 1
    return parts


def pp_stages(model: ModelSpec, pp: int) -> list[tuple[int, int]]:
    """(MoE layers, dense-MLP layers) of each pipeline stage; the dense layers are the first ones
    (DeepSeek's first_k_dense_replace), so they fall on the first stages."""
    dense_left = model.num_dense_mlp_layers
    out = []
    for n in pp_layers(model.num_layers, pp):
        d = min(dense_left, n)
        dense_left -= d
        out.append((n - d, d))
    return out


def pp_stage_weight_bytes(model: ModelSpec, weight_dtype: str, pp: int) -> list[float]:
    """Weights each pipeline stage's device holds: its layers, the embedding on the first, the
    final norm and LM head on the last (a copy of the embedding there when they are tied, as
    vLLM loads it)."""
    if pp == 1:
        return [model.weight_bytes(weight_dtype)]
    out = []
    emb, head, h = model.embedding_params * 2.0, model.vocab_size * model.hidden_size * 2.0, model.hidden_size * 2.0
    for i, (moe, dense) in enumerate(pp_stages(model, pp)):
        # (model_copy, unvalidated: a stage may hold no MoE layer of an MoE model)
        stage = model.model_copy(update={"num_layers": moe + dense, "num_dense_layers": dense if model.num_experts else 0})
        layers = stage.weight_bytes(weight_dtype) - emb - stage.lm_head_params * 2.0 - h
        out.append(layers + (emb if i == 0 else 0.0) + (head + h if i == pp - 1 else 0.0))
    return out


HF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3")
HF_DTYPES = ("bfloat16", "float16", "float32")


def model_from_hf_config(cfg: dict[str, Any], name: str, where: str) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json of the Llama, Mistral, Qwen2 or Qwen3 families."""
    family = cfg.get("model_type")
    if family not in HF_FAMILIES:
        raise NpusimError(f"{where}: model_type must be one of {', '.join(HF_FAMILIES)}, got {family!r}")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "vocab_size"):
        if key not in cfg:
            raise NpusimError(f"{where}: {key} is required")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "head_dim", "max_position_embeddings"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise NpusimError(f"{where}: {key} must be a whole number > 0, got {v!r}")
    for key in ("tie_word_embeddings", "attention_bias", "use_sliding_window"):
        if key in cfg and not isinstance(cfg[key], bool):
            raise NpusimError(f"{where}: {key} must be true or false, got {cfg[key]!r}")
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method") if isinstance(cfg["quantization_config"], dict) else None
        hint = {"fp8": " (an fp8 checkpoint: --weight-dtype fp8)",
                # int8 weights and activations (compressed-tensors W8A8, vllm-ascend's ModelSlim W8A8)
                "compressed-tensors": " (a W8A8 int8 checkpoint: --weight-dtype w8a8; weight-only int8: int8)",
                "ascend": " (vllm-ascend's W8A8: --weight-dtype w8a8)"}.get(method, "")
        raise NpusimError(f"{where}: a quantized checkpoint (quantization_config): npusim prices weights by "
                          f"--weight-dtype ({', '.join(WEIGHT_DTYPES)}); give the config without "
                          f"quantization_config and that flag{hint}")
    if cfg.get("use_sliding_window") or (family in ("mistral", "mixtral") and cfg.get("sliding_window")):
        raise NpusimError(f"{where}: sliding-window attention (sliding_window {cfg.get('sliding_window')}) is "
                          "not modelled: npusim prices full attention over the whole context")
    moe = [k for k in ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
           if cfg.get(k)]
    experts = {}
    if family in ("deepseek_v2", "deepseek_v3"):
        return _deepseek_from_hf(cfg, family, name, where)
    if cfg.get("shared_expert_intermediate_size") or cfg.get("n_shared_experts"):
        raise NpusimError(f"{where}: shared experts (shared_expert_intermediate_size / n_shared_experts) in a "
                          f"{family} config: npusim reads shared experts of deepseek_v2/deepseek_v3 configs only")
    foreign = {"qwen3_moe": ("num_local_experts",), "mixtral": ("num_experts", "moe_intermediate_size")}.get(family, ())
    stray = [k for k in foreign if k in cfg]
    if stray:
        raise NpusimError(f"{where}: {', '.join(stray)} is not a {family} key (it would be ignored)")
    if family == "qwen3_moe":
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            v = cfg.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise NpusimError(f"{where}: {key} must be a whole number > 0, got {v!r}")
        step = cfg.get("decoder_sparse_step", 1)
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise NpusimError(f"{where}: decoder_sparse_step must be a whole number >= 1, got {step!r}")
        if cfg["num_experts_per_tok"] > cfg["num_experts"]:
            raise NpusimError(f"{where}: num_experts_per_tok {cfg['num_experts_per_tok']} exceeds num_experts "
                              f"{cfg['num_experts']}")
        only = cfg.get("mlp_only_layers") or []
        layers = cfg["num_hidden_layers"]
        if not isinstance(only, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layers
                                             for i in only):
            raise NpusimError(f"{where}: mlp_only_layers must be a list of layer indices 0..{layers - 1}, got {only!r}")
        # as transformers' Qwen3MoeDecoderLayer: MoE where the layer is not listed and (i + 1) % step == 0
        moe_layers = sum(1 for i in range(layers) if i not in only and (i + 1) % step == 0)
        if not moe_layers:
            raise NpusimError(f"{where}: decoder_sparse_step {step} and mlp_only_layers leave no MoE layer of {layers}")
        experts = dict(num_experts=cfg["num_experts"], experts_per_token=cfg["num_experts_per_tok"],
                       moe_intermediate_size=cfg["moe_intermediate_size"], num_dense_layers=layers - moe_layers)
    elif family == "mixtral":
        for key in ("num_local_experts", "num_experts_per_tok"):
            v = cfg.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise NpusimError(f"{where}: {key} must be a whole number > 0, got {v!r}")
        if cfg["num_experts_per_tok"] > cfg["num_local_experts"]:
            raise NpusimError(f"{where}: num_experts_per_tok {cfg['num_experts_per_tok']} exceeds num_local_experts "
                              f"{cfg['num_local_experts']}")
        experts = dict(num_experts=cfg["num_local_experts"], experts_per_token=cfg["num_experts_per_tok"],
                       moe_intermediate_size=cfg["intermediate_size"])
    elif moe:
        raise NpusimError(f"{where}: a mixture-of-experts {family} model ({', '.join(moe)}): npusim reads "
                          "qwen3_moe and mixtral configs")
    dtype = _checkpoint_dtype(cfg, where)
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if hidden % heads:
            raise NpusimError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads "
                              f"{heads}: give head_dim")
        head_dim = hidden // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise NpusimError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads "
                          f"{kv_heads}")
    data = dict(
        name=name,
        num_layers=cfg["num_hidden_layers"],
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", family == "qwen2")),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        **experts,
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        source=f"{where} ({family}{', checkpoint ' + dtype if dtype else ''})",
    )
    return _validate(ModelSpec, data, where)


def _checkpoint_dtype(cfg: dict[str, Any], where: str) -> str | None:
    """The checkpoint's dtype (transformers writes torch_dtype, or dtype since 4.56). Engines serve
    16- and 32-bit checkpoints in 16 bits (vLLM's dtype "auto": fp32 and fp16 as fp16, bf16 as
    bf16), which --weight-dtype prices; anything else is a format npusim does not price."""
    dtype_key = "dtype" if "dtype" in cfg else "torch_dtype"
    dtype = cfg.get(dtype_key)
    if dtype is not None and dtype not in HF_DTYPES:
        raise NpusimError(f"{where}: {dtype_key} {dtype!r} is not a dtype npusim prices a checkpoint in "
                          f"({', '.join(HF_DTYPES)}); weights are priced by --weight-dtype")
    return dtype


def _whole(cfg: dict[str, Any], where: str, key: str, least: int = 1, default: Any = None) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < least:
        raise NpusimError(f"{where}: {key} must be a whole number >= {least}, got {v!r}")
    return v


def _deepseek_from_hf(cfg: dict[str, Any], family: str, name: str, where: str) -> ModelSpec:
    """DeepSeek-V2/V3: MLA attention, routed and shared experts, the first layers dense. (The
    multi-token-prediction module, num_nextn_predict_layers, is loaded only for speculative
    decoding, which npusim does not model: it is not counted.)"""
    mla = {k: _whole(cfg, where, k) for k in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                                              "v_head_dim")}
    q_lora = cfg.get("q_lora_rank")
    q_lora = 0 if q_lora is None else _whole(cfg, where, "q_lora_rank")
    layers = _whole(cfg, where, "num_hidden_layers")
    routed = _whole(cfg, where, "n_routed_experts")
    top_k = _whole(cfg, where, "num_experts_per_tok")
    if top_k > routed:
        raise NpusimError(f"{where}: num_experts_per_tok {top_k} exceeds n_routed_experts {routed}")
    if _whole(cfg, where, "moe_layer_freq", default=1) != 1:
        raise NpusimError(f"{where}: moe_layer_freq {cfg['moe_layer_freq']}: npusim models MoE layers after the "
                          "first first_k_dense_replace, every one (moe_layer_freq 1)")
    dense = _whole(cfg, where, "first_k_dense_replace", least=0, default=0)
    if dense >= layers:
        raise NpusimError(f"{where}: first_k_dense_replace {dense} leaves no MoE layer of {layers}")
    dtype = _checkpoint_dtype(cfg, where)  # (a quantization_config was refused before)
    data = dict(
        name=name, num_layers=layers, hidden_size=_whole(cfg, where, "hidden_size"),
        num_heads=_whole(cfg, where, "num_attention_heads"), num_kv_heads=1,
        head_dim=mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"],
        intermediate_size=_whole(cfg, where, "intermediate_size"), vocab_size=_whole(cfg, where, "vocab_size"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        num_experts=routed, experts_per_token=top_k,
        moe_intermediate_size=_whole(cfg, where, "moe_intermediate_size"),
        num_shared_experts=_whole(cfg, where, "n_shared_experts", least=0, default=0),
        num_dense_layers=dense, kv_lora_rank=mla["kv_lora_rank"], q_lora_rank=q_lora,
        qk_rope_head_dim=mla["qk_rope_head_dim"], v_head_dim=mla["v_head_dim"],
        max_position_embeddings=_whole(cfg, where, "max_position_embeddings", default=4096),
        source=f"{where} ({family}{', checkpoint ' + dtype if dtype else ''})")
    return _validate(ModelSpec, data, where)


def load_model(name_or_path: str | Path) -> ModelSpec:
    """A zoo model by name, or a Hugging Face config.json / npusim model YAML by path."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    key = str(name_or_path)
    if not key.strip():
        raise NpusimError("the model name is empty")
    if key.lower() in MODEL_ZOO:
        return ModelSpec(name=key.lower(), **MODEL_ZOO[key.lower()])
    p = Path(key)
    if p.suffix not in (".json", ".yaml", ".yml") and not p.is_dir():
        raise NpusimError(
            f"unknown model {key!r}; known: {', '.join(MODEL_ZOO)} (or give a path to a config.json)")
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        raise NpusimError(f"model file not found: {p}")
    data = load_mapping(p)
    if "model_type" in data:
        return model_from_hf_config(data, p.parent.name if p.name == "config.json" else p.stem, str(p))
    return _validate(ModelSpec, data, str(p))


# --------------------------------------------------------------------------- engine

# vLLM's cudagraph_modes, lower case
CUDAGRAPH_MODES = ("full_and_piecewise", "full_decode_only", "full", "piecewise", "none")


class EngineConfig(BaseModel):
    """The serving engine's memory and batching settings (vLLM's names where they exist)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    profile: str | None = Field(default=None, description="engine profile name or path; None: the device's default")
    block_size: int | None = Field(default=None, gt=0, description="None: the engine profile's recommended")
    # None: the engine profile's default (a real engine's, for the device it runs on)
    max_num_seqs: int | None = Field(default=None, gt=0)
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    num_blocks: int | None = Field(default=None, gt=0, description="measured block count; overrides the formula")
    max_model_len: int | None = Field(default=None, gt=0)
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool | None = None
    preemption_mode: Literal["recompute", "swap"] = "recompute"
    swap_space_gib: float = Field(default=4.0, ge=0)
    watermark: float | None = Field(default=None, ge=0, lt=1)
    paging: bool = True
    # "auto": continuous batching with paging, static batching without (the article's baseline);
    # "continuous" without paging is Orca-style iteration-level scheduling on contiguous reservations.
    batching: Literal["auto", "continuous", "static"] = "auto"
    weight_dtype: Literal[WEIGHT_DTYPES] = "bf16"
    kv_dtype: Literal["bf16", "fp16", "fp8", "int8"] = "bf16"
    tensor_parallel_size: int = Field(default=1, gt=0, le=64, description="devices one instance spans (--tp)")
    # experts over the tensor-parallel group, whole on one device each, instead of every expert
    # split over all of them (vLLM's --enable-expert-parallel); a multiple k of the tp size: the
    # experts over k data-parallel ranks of tp devices each, attention on each rank's own
    # sequences (DeepSeek's layout, vLLM's --data-parallel-size k with EP; tokens exchanged
    # all-to-all)
    expert_parallel_size: int = Field(default=1, gt=0, le=64,
                                      description="--ep: 1, the --tp size, or tp x the data-parallel ranks")
    # the busiest expert-parallel device's routed tokens over the mean, as measured on the user's
    # traffic (vLLM's expert-load statistics, EPLB's logs); None: uniform routing, the busiest of
    # ep devices near mean + sqrt(2 mean ln ep)
    expert_imbalance: float | None = Field(default=None, ge=1, le=64, allow_inf_nan=False,
                                           description="busiest / mean routed tokens per EP device (--expert-imbalance)")
    # pipeline stages, each on --tp devices of its own, the layers split as vLLM splits them
    pipeline_parallel_size: int = Field(default=1, gt=0, le=64, description="pipeline stages (--pp)")
    # which steps replay captured graphs, as vLLM's --compilation-config cudagraph_mode (lower
    # case), and the largest step captured (its max_cudagraph_capture_size); None: the engine
    # profile's (graph engines of vLLM only)
    cudagraph_mode: Literal[CUDAGRAPH_MODES] | None = None
    max_cudagraph_capture_size: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        # As vLLM: every running sequence must be able to decode in one iteration.
        if (self.max_num_batched_tokens is not None and self.max_num_seqs is not None
                and self.max_num_batched_tokens < self.max_num_seqs):
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs})")
        # A contiguous reservation has no pages to share or to move: these would be ignored.
        if not self.paging and self.enable_prefix_caching:
            raise ValueError("enable_prefix_caching needs paging (prefix caching shares KV pages); "
                             "drop --prefix-caching or --no-paging")
        if self.preemption_mode == "swap" and self.swap_space_gib == 0:
            raise ValueError("preemption_mode swap needs swap_space_gib > 0 (host memory to swap to)")
        if not self.paging and self.preemption_mode == "swap":
            raise ValueError("preemption_mode swap needs paging (pages are what is swapped); "
                             "drop --preemption swap or --no-paging")
        return self


def batching_mode(engine: EngineConfig) -> str:
    if engine.batching == "auto":
        return "continuous" if engine.paging else "static"
    if engine.batching == "static" and engine.paging:
        raise NpusimError("static batching is only modelled without paging (use --no-paging)")
    return engine.batching


def check_block_size(engine: EngineProfile, block_size: int) -> None:
    if block_size <= 0:
        raise NpusimError(f"block_size must be > 0, got {block_size}")
    rule = engine.kv_block_sizes
    if not rule.accepts(block_size):
        raise NpusimError(
            f"block_size {block_size} is not accepted by {engine.name}'s attention kernels; "
            f"allowed: {rule.describe()} (recommended {rule.recommended})")


def resolve_engine(hw: HardwareSpec, cfg: EngineConfig) -> tuple[EngineProfile, EngineConfig]:
    """The engine profile a configuration runs (its own, or the device's default) and the
    configuration with the profile's defaults filled in; a page size the engine's attention
    kernels do not take is refused."""
    profile = load_engine_profile(cfg.profile if cfg.profile is not None else hw.default_engine)
    if cfg.block_size is not None:
        check_block_size(profile, cfg.block_size)
    d = profile.scheduler_defaults
    seqs, tokens = d["max_num_seqs"], d["max_num_batched_tokens"]
    large = d.get("large_memory_gib")
    if large is not None and hw.memory_gib >= large and not any(x in hw.name for x in profile.large_memory_exclude):
        seqs, tokens = d["large_memory_max_num_seqs"], d["large_memory_max_num_batched_tokens"]
    given = cfg.model_dump()
    filled = {
        "block_size": profile.kv_block_sizes.recommended, "max_num_seqs": int(seqs),
        "max_num_batched_tokens": int(tokens), "gpu_memory_utilization": d["gpu_memory_utilization"],
        "watermark": d["watermark"],
        "enable_prefix_caching": bool(d["enable_prefix_caching"]) and cfg.paging,  # (pages to share)
    }
    for key, value in filled.items():
        if given[key] is None:
            given[key] = value
    if profile.max_capture_tokens is None:  # (an engine that captures every step whole)
        for key in ("cudagraph_mode", "max_cudagraph_capture_size"):
            if given[key] is not None:
                raise NpusimError(f"{key} {given[key]}: engine {profile.name} has no vLLM graph modes "
                                  f"({profile.execution}{', every step one graph' * (profile.execution == 'graph')})")
    else:
        if given["cudagraph_mode"] is None:
            given["cudagraph_mode"] = profile.graph_mode
        if given["max_cudagraph_capture_size"] is None:  # as vLLM sizes it
            given["max_cudagraph_capture_size"] = min(given["max_num_seqs"] * profile.capture_tokens_per_seq,
                                                      profile.max_capture_tokens)
    return profile, _validate(EngineConfig, given, "engine")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def gib(nbytes: float) -> float:
    return nbytes / 2**30

