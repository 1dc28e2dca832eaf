"""Roofline cost of one forward iteration, and the memory footprint of a model on a device.

Every op is priced as ``max(flops / effective compute, bytes / effective bandwidth)`` plus a fixed
per-kernel latency. Per-layer ops are the same for every layer, so they are priced once and
multiplied by the layer count. The simulator calls :meth:`CostModel.step_time` once per iteration:
the token-count-dependent dense part is memoised, the attention part is a few multiplications.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Sequence

from npusim.errors import NpusimError
from npusim.specs import (DTYPE_BYTES, KV_DTYPES, LAYER_OPS, MODEL_OP_KERNELS, STEP_OPS, WEIGHT_DTYPES, EngineConfig, ep_shard,
                          EngineProfile, HardwareSpec, ModelSpec, ceil_div, dtype_bytes, gib,
                          load_engine_profile, pp_stage_weight_bytes, pp_stages, resolve_engine, tp_shard)
from npusim.calibration import load_tables, transfer_of

ACT_BYTES = 2.0  # activations in bf16/fp16
LOGIT_BYTES = 4.0  # logits are upcast to fp32 for sampling


class Op(NamedTuple):
    """One op of an iteration, summed over layers where it repeats. (A named tuple: the simulator
    builds these for every new batch shape, and a tuple is the cheapest record to build.)"""

    name: str
    flops: float
    bytes: float
    time_s: float
    bound: str  # "compute" | "memory" | "latency" | "comm" (a collective over the tensor-parallel devices)
    kernels: int

    def as_dict(self) -> dict:
        d = self._asdict()
        d["time_ms"] = d.pop("time_s") * 1e3
        return d


def _reached(experts: float, chance: float, draws: float) -> float:
    """Experts that get at least one of `draws` uniform picks (each hitting a given expert with
    probability `chance`), on average: at least one, at most all."""
    return min(float(experts), max(1.0, experts * (1.0 - (1.0 - chance) ** draws)))


def _add(total: Op | None, op: Op, count: int) -> Op:
    """`total` plus `count` times `op` (the bound of whichever takes longer)."""
    t = op.time_s * count
    if total is None:
        return Op(op.name, op.flops * count, op.bytes * count, t, op.bound, op.kernels * count)
    return Op(op.name, total.flops + op.flops * count, total.bytes + op.bytes * count, total.time_s + t,
              total.bound if total.time_s >= t else op.bound, total.kernels + op.kernels * count)


def _pad_efficiency(x: int, tile: int) -> float:
    """Fraction of a tile-padded dimension that does useful work (a 17-row GEMM on a 16-row cube
    wastes 15 rows of its second pass)."""
    return x / (ceil_div(x, tile) * tile)


class Batch:
    """What one iteration runs, as the scheduler formed it: the only thing the cost model prices.

    ``scheduled`` is the scheduler's own list of (request, new tokens) it advanced one by one (prefill
    chunks, a swapped-in decode); the decode set's members are in the sums only. (A plain class
    with slots: one is made per simulated iteration.)"""

    __slots__ = ("num_decodes", "decode_context_tokens", "decode_kv_slots", "prefill_chunks",
                 "num_sampled", "swap_bytes", "scheduled")

    def __init__(self, num_decodes: int = 0, decode_context_tokens: int = 0, decode_kv_slots: int = 0,
                 prefill_chunks: list[tuple[int, int]] | None = None, num_sampled: int | None = None,
                 swap_bytes: float = 0.0, scheduled: list[Any] | None = None):
        self.num_decodes = num_decodes
        self.decode_context_tokens = decode_context_tokens  # each decode's cached tokens + 1
        self.decode_kv_slots = decode_kv_slots  # KV slots the decodes read: whole pages
        self.prefill_chunks = [] if prefill_chunks is None else prefill_chunks  # (new, cached)
        self.num_sampled = num_sampled  # rows whose logits are computed; None: every decode and chunk
        self.swap_bytes = swap_bytes  # KV moved between host and device memory before the iteration
        self.scheduled = [] if scheduled is None else scheduled

    @property
    def num_tokens(self) -> int:
        return self.num_decodes + sum(c for c, _ in self.prefill_chunks)

    def __repr__(self) -> str:
        return (f"Batch(decodes={self.num_decodes}, context={self.decode_context_tokens}, "
                f"slots={self.decode_kv_slots}, chunks={self.prefill_chunks}, swap={self.swap_bytes:g})")


class CostModel:
    """Prices iterations of `model` on `hw` (or on a partition of it, see HardwareSpec.partition)
    as `engine` runs them: the engine profile says how many kernels each op launches and what the
    host does; the hardware says how fast each kernel runs."""

    def __init__(self, hw: HardwareSpec, model: ModelSpec, weight_dtype: str = "bf16",
                 kv_dtype: str = "bf16", engine: EngineProfile | str | None = None,
                 block_size: int | None = None, tp: int = 1, ep: int = 1, pp: int = 1,
                 expert_imbalance: float | None = None, graph_mode: str | None = None,
                 capture_tokens: int | None = None):
        self.hw = hw
        self.model = model  # under tensor parallelism: one device's shard (specs.tp_shard)
        self.tp = tp
        self.ep = ep  # experts over the tp devices (1: every expert split over them)
        # ep > tp: experts over ep / tp data-parallel ranks of tp devices each, each rank with its
        # own batch, here taken as loaded like this one (symmetric ranks); tokens go to their
        # experts' devices all-to-all
        self.dp_ranks = ep // tp if ep > tp else 1
        self.expert_imbalance = expert_imbalance  # busiest / mean EP device's tokens; None: uniform
        self.pp = pp  # pipeline stages; ops and step_time are of the whole model, summed over them
        self.stages = pp_stages(model, pp)  # (MoE layers, dense layers) of each stage
        # stage i on devices i*tp .. (i+1)*tp - 1 of a pipeline placed from a node's first device:
        # its hand-over to stage i+1 leaves the node when that stage starts a node of its own
        self.cross_node = [(i + 1) * tp % hw.node_devices == 0 for i in range(pp - 1)]
        self.engine = load_engine_profile(engine if engine is not None else hw.default_engine)
        # the KV page size, for a measured paged-attention kernel that pays per page
        self.block_size = block_size or self.engine.kv_block_sizes.recommended
        self.kernels = dict(self.engine.kernels)
        self.weight_dtype = weight_dtype
        self.kv_dtype = kv_dtype
        self.w_bytes = dtype_bytes(weight_dtype, WEIGHT_DTYPES, "weight_dtype")
        self.kv_bytes = dtype_bytes(kv_dtype, KV_DTYPES, "kv_dtype")
        # linear layers compute in the weights' format where the device has its matrix units (FP8
        # on Hopper), else at 16 bits; attention always at 16 bits
        act16 = "fp16" if weight_dtype == "fp16" else "bf16"
        compute_dtype = weight_dtype if weight_dtype in ("fp16", "fp8", "w8a8") else "bf16"
        # w8a8 on int8 matrix units: each quantised GEMM's input is quantised to int8 first, in
        # act_quant kernels of their own that read it (16-bit) and write it (8-bit) once
        self._act_quant = ((weight_dtype == "w8a8" and hw.matmul_tflops_int8 is not None)
                           or (weight_dtype == "fp8" and hw.matmul_tflops_fp8 is not None))
        # the quantisation kernels' fixed cost and streaming rate where the engine measured them
        # (else a kernel's least time and the device's streaming rate)
        e = self.engine
        self._quant_fixed = {False: e.act_quant_fixed_us, True: e.act_quant_moe_fixed_us}
        self._quant_bw = e.act_quant_gbs * 1e9 if e.act_quant_gbs is not None else None
        self._peak = hw.matmul_tflops(compute_dtype) * 1e12  # a linear layer's
        self._peak16 = hw.matmul_tflops(act16) * 1e12  # attention's, and what the tables were measured at
        self.mm_rate = self._peak * hw.matmul_efficiency
        self.attn_rate = self._peak16 * hw.matmul_efficiency
        self.vec_rate = hw.vector_tflops * 1e12 * hw.vector_efficiency
        # streaming from HBM: its bandwidth or the cores' pull, whichever is less, at the share
        # kernels reach
        self.bw = hw.streaming_gbs * 1e9 * hw.memory_efficiency
        self.latency = hw.kernel_latency_us * 1e-6  # the least device time of one kernel
        self.gemm_fixed = hw.gemm_fixed_us * 1e-6  # a GEMM kernel's time beyond its roofline
        # ... a quantised linear layer's (W8A8's epilogue dequantises by the scales)
        self._linear_fixed = self.gemm_fixed
        if self._act_quant and hw.int8_gemm_fixed_us is not None:
            self._linear_fixed = hw.int8_gemm_fixed_us * 1e-6
        # causal prefill attention's rate where no table measured it: its own share of the peak
        # where the profile gives one, else the GEMM rate
        self._flash_rate = (self._peak16 * hw.flash_attention_efficiency
                            if hw.flash_attention_efficiency is not None else None)
        # measured kernel times of this device, when its profile was calibrated
        self.tables = load_tables(tuple(hw.calibration_files), transfer_of(hw)) if hw.calibration_files else None
        # FP8 weights on a device with FP8 matrix units and its FP8 GEMMs timed
        self._quant_table = (self.tables.gemm_fp8 if self.tables is not None and weight_dtype == "fp8"
                           and hw.matmul_tflops_fp8 is not None else None)
        if self.tables is not None and weight_dtype == "w8a8" and self._act_quant:
            # w8a8: the device's int8 GEMMs, the same way; where only its FP8 GEMMs were timed and
            # its int8 units run at the FP8 rate (Hopper), those: the same bytes at the same peak
            if self.tables.gemm_int8 is not None:
                self._quant_table = self.tables.gemm_int8
            elif self.tables.gemm_fp8 is not None and hw.matmul_tflops_fp8 == hw.matmul_tflops_int8:
                self._quant_table = self.tables.gemm_fp8
        # the least time of one kernel of each op in this engine's implementation
        floors = self.engine.kernel_floor_us
        self.floor = {op: floors.get(op, hw.kernel_latency_us) * 1e-6 for op in LAYER_OPS + STEP_OPS + tuple(MODEL_OP_KERNELS)}
        norm = self.engine.norm_kernel
        if norm is not None and self.tables is not None:
            # this engine's norm kernel was timed on this device: its least time at this width
            self._norm_floor = {op: self.tables.chains.time(norm, 8, w) for op, w in
                                (("rmsnorm_attn", model.hidden_size), ("rmsnorm_mlp", model.hidden_size),
                                 ("final_norm", model.hidden_size), ("qk_norm", model.head_dim))}
            if None in self._norm_floor.values():
                raise NpusimError(f"engine {self.engine.name}: norm kernel {norm!r} is not among "
                                  f"{hw.name}'s timed kernel chains")
            self.floor.update(self._norm_floor)
        self._peak_bw = hw.memory_bandwidth_gbs * 1e9
        self.host_link_bytes_per_s = hw.host_link_gbs * 1e9
        self.kv_bytes_per_token_layer = model.kv_values_per_token_layer * self.kv_bytes
        e = self.engine
        # decode attention moves each KV byte this many times (a gather copy reads, writes, reads)
        self._kv_read_bytes_per_slot = self.kv_bytes_per_token_layer * e.decode_kv_passes
        self.host_overhead_s = e.host_per_iteration_ms * 1e-3
        self.host_per_sequence_s = e.host_per_sequence_us * 1e-6
        self.dispatch_s = e.dispatch_per_kernel_us * 1e-6
        self.graph_launch_s = e.graph_launch_us * 1e-6
        # a whole-graph step's host refresh of every layer's attention task, overlapping the replay
        self.graph_update_s = (e.graph_update_per_layer_us or 0.0) * 1e-6 * model.num_layers
        # Which steps run from captured graphs (vLLM's cudagraph_mode; "none": every step eager),
        # and the largest captured step in tokens (None: no limit). Default: the profile's mode,
        # captured up to its max_capture_tokens.
        self.graph_mode = graph_mode or e.graph_mode
        self.capture_tokens = capture_tokens if capture_tokens is not None else e.max_capture_tokens
        if e.execution != "graph" and self.graph_mode != e.graph_mode:
            raise NpusimError(f"cudagraph_mode {self.graph_mode}: engine {e.name} runs {e.execution}, "
                              "without captured graphs")
        # every step one captured graph, of any size (the common case, inlined in price())
        self._graph = e.execution == "graph" and self.graph_mode == "full" and self.capture_tokens is None
        # decode-only steps of at most this many tokens are one captured graph
        self._decode_graph_tokens = -1
        if e.execution == "graph" and self.graph_mode in ("full", "full_and_piecewise", "full_decode_only"):
            self._decode_graph_tokens = self.capture_tokens if self.capture_tokens is not None else 1 << 62
        # ops of MLA and MoE models, by their defaults where the profile does not count them
        for op, n in MODEL_OP_KERNELS.items():
            self.kernels.setdefault(op, n)
        self._step_kernels = sum(self.kernels[o] for o in STEP_OPS)
        # memoised by token count (and sampled rows): iterations repeat the same shapes
        self._layer_cache: dict[int, float] = {}
        self._head_cache: dict[int, float] = {}
        # Decode attention per layer: Q·K and P·V over the whole context for every head. MLA decodes
        # with the up-projections absorbed: each head scores the latent and the RoPE key (kv_dim)
        # and sums the latent (kv_lora_rank), all heads reading the one cached latent.
        m = model
        if m.mla:
            self._attn_flops_per_ctx = 2.0 * m.num_heads * (m.kv_dim + m.kv_lora_rank)
            self._decode_q_bytes = m.num_heads * (m.kv_dim + m.kv_lora_rank) * ACT_BYTES
            # prefill decompresses K and V per head: attention as MHA of head_dim and v_head_dim
            self._prefill_flops_per_pair = 2.0 * m.num_heads * (m.head_dim + m.v_head_dim)
        else:
            self._attn_flops_per_ctx = 4.0 * m.num_heads * m.head_dim
            self._decode_q_bytes = 2.0 * m.q_dim * ACT_BYTES
            self._prefill_flops_per_pair = self._attn_flops_per_ctx
        group = m.num_heads // m.num_kv_heads
        # GQA packs the query heads of one KV head as the rows of a small GEMM.
        self._attn_decode_rate = self.attn_rate * _pad_efficiency(group, hw.matmul_tile_m)
        self._decode_kernels = self.kernels["attention_decode"]
        # MLA's decode kernel where the engine timed it apart (else the op's)
        mla_floor = self.engine.kernel_floor_us.get("attention_decode_mla") if m.mla else None
        self._decode_floor = mla_floor * 1e-6 if mla_floor is not None else self.floor["attention_decode"]
        impl = self.engine.mla_decode_attention_impl if m.mla else self.engine.decode_attention_impl
        # the table's key: an MLA kernel reads one latent (+ RoPE key) of kv_dim values a token
        self._decode_layout = (impl, m.num_heads, 1, m.kv_dim) if m.mla else \
            (impl, m.num_heads, m.num_kv_heads, m.head_dim)
        self._decode_table = None
        if impl is not None and self.tables is not None:
            if impl not in self.tables.decode_attention.impls():
                raise NpusimError(f"engine {self.engine.name}: decode attention {impl!r} is not in "
                                  f"{hw.name}'s calibration ({', '.join(sorted(self.tables.decode_attention.impls()))})")
            self._decode_table = self.tables.decode_attention
        self._decode_cache: dict[tuple[int, int], float] = {}
        # the tables timed a 16-bit cache: an 8-bit one reads fewer bytes in the same kernel
        self._kv_table_scale = self.kv_bytes / ACT_BYTES
        self._kv_unread_bytes_per_slot = self._kv_read_bytes_per_slot * (1.0 / self._kv_table_scale - 1.0)
        self._absorb_cache: dict[int, float] = {}
        self._kind_cache: dict[int, tuple[float, float, float, float]] = {}
        # kernels an iteration launches outside attention
        self._dense_kernels = sum(n * sum(o.kernels for o in ops) for n, ops in self.layer_groups(1))

    # -- primitive pricing -----------------------------------------------------------------------
    def _price(self, flops: float, nbytes: float, rate: float, kernels: int,
               floor: float | None = None, fixed: float = 0.0) -> tuple[float, str]:
        """One of the op's kernels does its work (the roofline plus the kernel's `fixed` time, or
        less than that kernel's least time); each other kernel costs its least time. A fused op (no
        kernel of its own) costs only its work, in its neighbour's kernel."""
        tc = flops / rate
        tm = nbytes / self.bw
        t = max(tc, tm)
        bound = "compute" if tc >= tm else "memory"
        if not kernels:
            return t, bound
        t += fixed
        floor = self.latency if floor is None else floor
        if floor > t:
            t, bound = floor, "latency"
        return t + (kernels - 1) * floor, bound

    def _gemm_roofline(self, m: int, n: int, k: int, weight_bytes: float = ACT_BYTES,
                       peak: float | None = None) -> float:
        """The datasheet roofline of a GEMM (at the 16-bit peak the tables were measured at, or
        `peak`): only a ratio between shapes and formats, for the measured table."""
        return max(2.0 * m * n * k / (peak or self._peak16),
                   (n * k * weight_bytes + (m * k + m * n) * ACT_BYTES) / self._peak_bw)

    def gemm(self, m: int, k: int, n: int, weight_bytes_per_elem: float = ACT_BYTES, kernels: int = 1,
             name: str = "gemm", quantise_input: bool = True) -> Op:
        """One (m x k) @ (k x n) GEMM whose weight has `weight_bytes_per_elem`, in `kernels` kernels:
        the measured time of the device when it was calibrated, else the roofline with tile padding.
        Kernels beyond the GEMM (a split-K reduction, a slice) cost their least time each. Under
        w8a8 a quantised weight's GEMM first quantises its input (quantise_input False: the GEMM
        kernels alone, their input already int8)."""
        hw = self.hw
        flops = 2.0 * m * n * k
        # a GEMM whose weight is kept in 16 bits (the LM head, the router) computes at 16 bits
        # whatever the other layers' format; a W8A8 GEMM reads its input quantised, a byte each
        lin16 = weight_bytes_per_elem == ACT_BYTES
        x_bytes = 1.0 if self._act_quant and not lin16 else ACT_BYTES
        nbytes = n * k * weight_bytes_per_elem + m * k * x_bytes + m * n * ACT_BYTES
        floor = self.floor.get(name, self.latency)
        peak, rate = (self._peak16, self.attn_rate) if lin16 else (self._peak, self.mm_rate)
        if self.tables is not None and kernels:
            if self._quant_table is not None and not lin16:
                # FP8 (or w8a8's int8) weights on their own tensor cores, timed on this device: their
                # own table, carried between shapes by that format's roofline
                t = self._quant_table.time(m, n, k, lambda mm, nn, kk: self._gemm_roofline(mm, nn, kk, 1.0, peak))
            else:
                t = self.tables.gemm.time(m, n, k, self._gemm_roofline)
                if not lin16 or peak != self._peak16:
                    # measured in bf16: carried to the weight's bytes (and FP8's compute rate)
                    t *= (self._gemm_roofline(m, n, k, weight_bytes_per_elem, peak)
                          / self._gemm_roofline(m, n, k))
            bound = "compute" if flops / peak >= nbytes / self._peak_bw else "memory"
            t += (kernels - 1) * floor
        else:
            eff = (_pad_efficiency(m, hw.matmul_tile_m) * _pad_efficiency(n, hw.matmul_tile_n)
                   * _pad_efficiency(k, hw.matmul_tile_k))
            t, bound = self._price(flops, nbytes, rate * eff, kernels, floor,
                                   self.gemm_fixed if lin16 else self._linear_fixed)
        if self._act_quant and not lin16 and kernels and quantise_input:
            qt, qbytes, qk = self._quantise(m * k)
            t, nbytes, kernels = t + qt, nbytes + qbytes, kernels + qk
        return Op(name, flops, nbytes, t, bound, kernels)

    def _quantise(self, elements: float, experts: bool = False) -> tuple[float, float, int]:
        """(seconds, bytes, kernels) of quantising `elements` 16-bit activations to 8 bits (w8a8,
        fp8): read once, written once at a byte each, in the engine's act_quant kernels, at their
        measured fixed cost and rate where the engine gives them (a dense layer's static
        quantisation, or the experts' dynamic one), else at a kernel's least time."""
        n = self.kernels["act_quant"]
        if not n:  # (fused into the GEMM or the norm before it)
            return 0.0, 0.0, 0
        nbytes = elements * (ACT_BYTES + 1.0)
        fixed = self._quant_fixed[experts]
        if fixed is not None:
            t = fixed * 1e-6 + nbytes / (self._quant_bw or self.bw) + (n - 1) * self.floor["act_quant"]
        else:
            t, _ = self._price(2.0 * elements, nbytes, self.vec_rate, n, self.floor["act_quant"])
        return t, nbytes, n

    def _gemm(self, name: str, m: int, k: int, n: int, weight_bytes_per_elem: float) -> Op:
        return self.gemm(m, k, n, weight_bytes_per_elem, self.kernels[name], name)

    def vector(self, flops: float, nbytes: float, kernels: int = 1, name: str = "vector",
               passes: int = 1) -> Op:
        """Elementwise or reduction work on the vector units, in `kernels` kernels that each move
        the op's `nbytes` (`passes` times in all)."""
        nbytes *= passes
        t, bound = self._price(flops, nbytes, self.vec_rate, kernels, self.floor.get(name, self.latency))
        return Op(name, flops, nbytes, t, bound, kernels)

    def _vector(self, name: str, flops: float, nbytes: float) -> Op:
        # An unfused op's kernels each read and write its tensors (a rotary embedding of five
        # elementwise kernels moves them five times); the KV write's kernels split k from v.
        k = self.kernels[name]
        passes = 1 if name == "kv_cache_write" else max(1, k)
        return self.vector(flops, nbytes, k, name, passes)

    def collective(self, name: str, kind: str, nbytes: float, n: int | None = None) -> Op:
        """One collective over the tp devices (or `n`) of a tensor of `nbytes` (what each device
        holds after it): an all-reduce moves 2(N-1)/N of it through each device's link, an
        all-gather or an all-to-all (N-1)/N; a full mesh or a switch does it in 2 steps (1 for the
        others), a ring in 2(N-1) (N-1). Time: steps x latency + bytes / (link bandwidth x
        efficiency)."""
        n, hw = n or self.tp, self.hw
        if n == 1 or nbytes <= 0:
            return Op(name, 0.0, 0.0, 0.0, "comm", 0)
        if n > hw.node_devices:  # whole nodes (instance_setup says so)
            if kind == "all_to_all":
                return self._all_to_all_across_nodes(name, nbytes, n)
            return self._hierarchical(name, kind, nbytes, n)
        factor = 2.0 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n
        if hw.link_topology == "ring":
            steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
        else:
            steps = 2 if kind == "all_reduce" else 1
        moved = factor * nbytes
        t = steps * hw.link_latency_us * 1e-6 + moved / (hw.link_gbs * 1e9 * hw.link_efficiency)
        return Op(name, 0.0, moved, t, "comm", 1)

    def _all_to_all_across_nodes(self, name: str, nbytes: float, n: int) -> Op:
        """An all-to-all over n devices of n / node_devices whole nodes: of what each device holds,
        (node - 1)/n goes to the devices of its own node over the node's link and (n - node)/n to
        the other nodes' over the link between nodes, both at once (separate ports), so the
        slower of the two sets the time, after the message latencies of both."""
        hw, node = self.hw, self.hw.node_devices
        local, remote = (node - 1) / n * nbytes, (n - node) / n * nbytes
        steps = node - 1 if hw.link_topology == "ring" else 1
        t = ((steps * hw.link_latency_us + hw.internode_latency_us) * 1e-6
             + max(local / (hw.link_gbs * 1e9 * hw.link_efficiency),
                   remote / (hw.internode_link_gbs * 1e9 * hw.link_efficiency)))
        return Op(name, 0.0, local + remote, t, "comm", 1)

    def _hierarchical(self, name: str, kind: str, nbytes: float, n: int) -> Op:
        """An all-reduce (or all-gather) over n devices of n / node_devices whole nodes, as NCCL and
        HCCL run it across nodes: a reduce-scatter within each node (an all-reduce only), the
        collective over the nodes of each device's 1/node share, device to device over the link
        between nodes, then an all-gather within each node. Each phase as collective() prices it,
        the middle one at the link between nodes and its latency, one after another."""
        hw, node = self.hw, self.hw.node_devices
        nodes = n // node
        ring = hw.link_topology == "ring"
        intra = (node - 1) / node * nbytes  # each within-node phase moves this through a device
        intra_steps = node - 1 if ring else 1
        phases = 2 if kind == "all_reduce" else 1
        # (between nodes a ring: 2 (nodes - 1) steps for an all-reduce, nodes - 1 for a gather)
        inter_factor = 2.0 * (nodes - 1) / nodes if kind == "all_reduce" else (nodes - 1) / nodes
        inter = inter_factor * nbytes / node
        inter_steps = (2 if kind == "all_reduce" else 1) * (nodes - 1)
        link = hw.link_gbs * 1e9 * hw.link_efficiency
        t = (phases * (intra_steps * hw.link_latency_us * 1e-6 + intra / link)
             + inter_steps * (hw.link_latency_us + hw.internode_latency_us) * 1e-6
             + inter / (hw.internode_link_gbs * 1e9 * hw.link_efficiency))
        return Op(name, 0.0, phases * intra + inter, t, "comm", 1)

    @property
    def _linear_weight_bytes(self) -> float:
        if self.weight_dtype == "int4":
            return self.w_bytes + 2.0 / 128  # one 16-bit scale per group of 128
        return self.w_bytes

    # -- op lists --------------------------------------------------------------------------------
    def layer_groups(self, tokens: int, all_tokens: int | None = None) -> list[tuple[int, list[Op]]]:
        """(layers, ops of one of them) for each kind of layer the model has: MoE layers, and the
        dense ones (every layer of a dense model; DeepSeek's first layers). `all_tokens`: see
        _moe_ops."""
        m = self.model
        groups = [(m.num_moe_layers, self.layer_dense_ops(tokens, moe=True, all_tokens=all_tokens))
                  if m.num_moe_layers else None,
                  (m.num_dense_mlp_layers, self.layer_dense_ops(tokens, moe=False)) if m.num_dense_mlp_layers else None]
        return [g for g in groups if g is not None]

    def layer_dense_ops(self, tokens: int, moe: bool | None = None, all_tokens: int | None = None) -> list[Op]:
        """Ops of one layer whose cost depends only on the number of new tokens (attention aside):
        an MoE layer (the default, when the model has experts) or a dense one. `all_tokens`: see
        _moe_ops."""
        m = self.model
        moe = bool(m.num_experts) if moe is None else moe
        h, f, T, w = m.hidden_size, m.intermediate_size, tokens, self._linear_weight_bytes
        ops = [self._vector("rmsnorm_attn", 4.0 * T * h, 2.0 * T * h * ACT_BYTES + h * ACT_BYTES)]
        if m.mla:
            ops += self._mla_projections(T)
        else:
            qkv_n = m.q_dim + 2 * m.kv_dim
            ops.append(self._gemm("qkv_proj", T, h, qkv_n, w))
            if m.qkv_bias:  # Qwen2: a bias on q, k and v
                ops.append(self._vector("qkv_bias", T * qkv_n, 2.0 * T * qkv_n * ACT_BYTES + qkv_n * ACT_BYTES))
            if m.qk_norm:  # Qwen3: RMSNorm over each head of q and k
                qk = m.q_dim + m.kv_dim
                ops.append(self._vector("qk_norm", 4.0 * T * qk, 2.0 * T * qk * ACT_BYTES + 2 * m.head_dim * ACT_BYTES))
            ops.append(self._vector("rope", 6.0 * T * (m.q_dim + m.kv_dim), 2.0 * T * (m.q_dim + m.kv_dim) * ACT_BYTES))
        ops += [
            self._vector("kv_cache_write", 0.0, T * m.kv_values_per_token_layer * (ACT_BYTES + self.kv_bytes)),
            self._gemm("o_proj", T, m.o_dim, h, w),
            *self._all_reduce("all_reduce_attn", T),
            self._vector("residual_attn", T * h, 3.0 * T * h * ACT_BYTES),
            self._vector("rmsnorm_mlp", 4.0 * T * h, 2.0 * T * h * ACT_BYTES + h * ACT_BYTES),
            *(self._moe_ops(T, all_tokens) if moe else [
                self._gemm("gate_up_proj", T, h, 2 * f, w),
                self._vector("silu_mul", 5.0 * T * f, 3.0 * T * f * ACT_BYTES),
                self._gemm("down_proj", T, f, h, w)]),
            *self._all_reduce("all_reduce_mlp", T),
            self._vector("residual_mlp", T * h, 3.0 * T * h * ACT_BYTES),
        ]
        return ops

    def _mla_projections(self, T: int) -> list[Op]:
        """MLA's way to q, the latent and the RoPE key (DeepSeek-V2/V3, as vLLM runs it): one GEMM
        from the hidden state to the compressed q (or q itself) and the latent with the RoPE key
        (fused_qkv_a_proj; whole on every tensor-parallel device), RMSNorms of the compressed q and
        the latent (counted as the qk_norm op's kernels), the up-projection of q to the heads
        (q_b_proj), and RoPE on each head's rotary part and the shared key."""
        m, h, w = self.model, self.model.hidden_size, self._linear_weight_bytes
        ql, c, dr = m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim
        a_n = (ql if ql else m.q_dim) + c + dr
        ops = [self._gemm("qkv_proj", T, h, a_n, w)]
        normed = ql + c
        # the profile's qk_norm kernels normalise two tensors (Qwen3's q and k); MLA has two with
        # a compressed q (q and the latent), else one
        k = self.kernels["qk_norm"] if ql else ceil_div(self.kernels["qk_norm"], 2)
        ops.append(self.vector(4.0 * T * normed, 2.0 * T * normed * ACT_BYTES + normed * ACT_BYTES, k, "qk_norm",
                               max(1, k)))
        if ql:
            ops.append(self._gemm("q_b_proj", T, ql, m.q_dim, w))
        rot = m.num_heads * dr + dr
        ops.append(self._vector("rope", 6.0 * T * rot, 2.0 * T * rot * ACT_BYTES))
        return ops

    def mla_absorb_op(self, num_decodes: int) -> Op:
        """MLA decode's two batched GEMMs (one GEMM per head): each head's no-RoPE query into the
        latent space (W_UK), and the attention output out of it (W_UV), as vLLM's MLA backends run
        decode. Priced by the roofline: no measured batched GEMM."""
        m = self.model
        H, c, dv = m.num_heads, m.kv_lora_rank, m.v_head_dim
        dn = m.head_dim - m.qk_rope_head_dim
        D = num_decodes
        flops = 2.0 * D * H * c * (dn + dv)
        nbytes = H * c * (dn + dv) * ACT_BYTES + D * H * (dn + 2 * c + dv) * ACT_BYTES
        eff = _pad_efficiency(D, self.hw.matmul_tile_m)
        k = self.kernels["mla_absorb"]
        # (vLLM keeps the absorbed up-projections in 16 bits: attention's rate)
        t, bound = self._price(flops, nbytes, self.attn_rate * eff, k, self.floor["mla_absorb"], self.gemm_fixed)
        return Op("mla_absorb", flops, nbytes, t, bound, k)

    def kv_b_proj_op(self, kv_tokens: int) -> Op:
        """MLA prefill: the latent of every token a chunk attends to (its cached context and itself)
        up-projected to each head's K (no-RoPE part) and V, so prefill runs as ordinary attention."""
        m = self.model
        dn = m.head_dim - m.qk_rope_head_dim
        # (W8A8 checkpoints keep it in 16 bits: vllm-ascend's DeepSeek-V3 W8A8 prefill runs it as a
        # bf16 MatMulV2, 2048 x 512, per_shape_cv_output.txt, Horacehxw/msModeling @39df672)
        w = ACT_BYTES if self.weight_dtype == "w8a8" else self._linear_weight_bytes
        return self._gemm("kv_b_proj", kv_tokens, m.kv_lora_rank, m.num_heads * (dn + m.v_head_dim), w)

    def _moe_ops(self, tokens: int, all_tokens: int | None = None) -> list[Op]:
        """A mixture-of-experts MLP: the router (a GEMM to the experts' scores, top-k, and the
        permutation of tokens by expert), then each expert's SwiGLU on the tokens routed to it as
        grouped GEMMs. With uniform routing, T tokens choosing k of E experts reach
        E (1 - (1 - k/E)^T) of them on average; each of those experts' weights is read once, and
        its GEMMs have M = T k / active rows. A grouped GEMM is one kernel over all experts,
        priced by the roofline, or by the device's measured grouped GEMMs where it has them.
        With data-parallel ranks the experts get every rank's tokens: `all_tokens` of this step,
        or, not given, `tokens` from each rank."""
        m, hw = self.model, self.hw
        h, E, k, fe, w = m.hidden_size, m.num_experts, m.experts_per_token, m.moe_intermediate_size, self._linear_weight_bytes
        ranks = self.dp_ranks  # (1 without data-parallel ranks)
        total = tokens * ranks if all_tokens is None or ranks == 1 else all_tokens
        routed = total * k
        active = _reached(E, k / E, total)
        ep = self.ep
        if ep > 1:  # whole experts, E/ep on each device: the busiest device sets the pace
            fe, E_local = fe * ep, E // ep  # (the shard split each expert; expert parallelism keeps them whole)
            mean = routed / ep
            if self.expert_imbalance is not None:  # measured on the user's traffic
                here = min(float(routed), mean * self.expert_imbalance)
            else:
                # uniform routing: a device's share of the assignments is about Poisson, the busiest
                # of ep devices near mean + sqrt(2 mean ln ep)
                here = min(float(routed), mean + math.sqrt(2.0 * mean * math.log(ep)))
            here_active = _reached(E_local, 1.0 / E_local, here)
        else:
            here, here_active = routed, active
        rows = max(1, round(here / here_active))
        # router: the score GEMM (16-bit), then softmax/top-k and the gather of tokens by expert
        router = self.gemm(tokens, h, E, ACT_BYTES, kernels=self.kernels["moe_router"], name="moe_router")
        ops = [router]
        # each rank sends its tokens' rows to the devices of their experts, and back; within a rank
        # of tp devices each sends 1/tp of the rank's tokens (vllm-ascend's MC2 dispatch splits
        # them over the TP group; the layer's TP all-reduce then stands for gathering them back)
        mine = tokens / self.tp
        # under w8a8 the dispatch quantises what it sends (vllm-ascend's MC2 dispatch, quant_mode 2:
        # vllm_ascend/ops/fused_moe/token_dispatcher.py, commit 182b75ea): int8 rows there, and
        # the experts' first GEMM finds its input quantised
        quantised_dispatch = ranks > 1 and self._act_quant and self.weight_dtype == "w8a8"
        if ranks > 1:
            sent = mine * k * h * ACT_BYTES
            sent_there = mine * k * h * (1.0 if quantised_dispatch else ACT_BYTES)
            ops.append(self.collective("all_to_all_dispatch", "all_to_all", sent_there, ep))
        table = self.tables.grouped_gemm if self.tables is not None and self.tables.grouped_gemm.curves else None
        for name, n_in, n_out in (("gate_up_proj", h, 2 * fe), ("down_proj", fe, h)):
            flops = 2.0 * here * n_in * n_out
            x_bytes = 1.0 if self._act_quant else ACT_BYTES
            nbytes = here_active * n_in * n_out * w + here * (n_in * x_bytes + n_out * ACT_BYTES)
            eff = (_pad_efficiency(rows, hw.matmul_tile_m) * _pad_efficiency(n_out, hw.matmul_tile_n)
                   * _pad_efficiency(n_in, hw.matmul_tile_k))
            t, bound = self._price(flops, nbytes, self.mm_rate * eff, self.kernels[name],
                                   self.floor.get(name, self.latency), self._linear_fixed)
            if table is not None:  # this device's grouped GEMMs were measured: their time, carried
                measured = table.time(name, E, k, h, m.moe_intermediate_size, total,
                                      self._grouped_roofline(name))
                if measured is not None:
                    t = measured * (w / ACT_BYTES if nbytes > flops / self._peak * self._peak_bw
                                    else self._peak16 / self._peak)
                    if ep > 1:  # measured on split experts: carried to whole ones by the roofline
                        split = (n_in, n_out // ep) if name == "gate_up_proj" else (n_in // ep, n_out)
                        t *= self._grouped_time(here, here_active, n_in, n_out) / self._grouped_time(
                            routed, active, *split)
            kernels = self.kernels[name]
            if self._act_quant and kernels and not (quantised_dispatch and name == "gate_up_proj"):
                qt, qbytes, qk = self._quantise(here * n_in, experts=True)  # the routed rows' inputs
                t, nbytes, kernels = t + qt, nbytes + qbytes, kernels + qk
            ops.append(Op(name, flops, nbytes, t, bound, kernels))
            if name == "gate_up_proj":
                ops.append(self._vector("silu_mul", 5.0 * here * fe, 3.0 * here * fe * ACT_BYTES))
        if ranks > 1:
            ops.append(self.collective("all_to_all_combine", "all_to_all", sent, ep))
        # combine: every routed row read once (weighted), each token's row written once
        back, own = (mine * k, mine) if ranks > 1 else (here, tokens)
        ops.append(self._vector("moe_combine", 2.0 * back, (back + own) * h * ACT_BYTES))
        if m.num_shared_experts:
            ops.append(self._shared_experts_op(tokens))
        return ops

    def _shared_experts_op(self, tokens: int) -> Op:
        """The shared experts every token goes through (DeepSeek): a dense SwiGLU as wide as all of
        them (vLLM runs them as one MLP beside the routed experts), split over the tp devices."""
        m, w = self.model, self._linear_weight_bytes
        h, fs = m.hidden_size, m.num_shared_experts * m.moe_intermediate_size
        parts = [self._gemm("gate_up_proj", tokens, h, 2 * fs, w),
                 self._vector("silu_mul", 5.0 * tokens * fs, 3.0 * tokens * fs * ACT_BYTES),
                 self._gemm("down_proj", tokens, fs, h, w)]
        slowest = max(parts, key=lambda o: o.time_s)
        return Op("shared_experts", sum(o.flops for o in parts), sum(o.bytes for o in parts),
                  sum(o.time_s for o in parts), slowest.bound, sum(o.kernels for o in parts))

    def _grouped_time(self, routed: float, active: float, n_in: int, n_out: int) -> float:
        """The datasheet roofline of a grouped GEMM (bf16) of `routed` rows over `active` experts:
        only a ratio, to carry a measured time to another layout."""
        return max(2.0 * routed * n_in * n_out / self._peak16,
                   (active * n_in * n_out + routed * (n_in + n_out)) * ACT_BYTES / self._peak_bw)

    def _grouped_roofline(self, op: str):
        """_grouped_time as a function of the expert layout and the tokens (for the measured table)."""
        def roofline(E, k, h, f, tokens):
            n_in, n_out = (h, 2 * f) if op == "gate_up_proj" else (f, h)
            return self._grouped_time(tokens * k, _reached(E, k / E, tokens), n_in, n_out)
        return roofline

    def _all_reduce(self, name: str, tokens: int) -> list[Op]:
        """Row-parallel o_proj and down_proj leave partial sums on every device: an all-reduce of
        the tokens' hidden states (none on one device)."""
        if self.tp == 1:
            return []
        return [self.collective(name, "all_reduce", tokens * self.model.hidden_size * ACT_BYTES)]

    def edge_ops(self, tokens: int, sampled: int) -> list[Op]:
        """Ops run once per iteration: embedding, final norm, LM head and sampling."""
        return [self.embedding_op(tokens)] + self.head_ops(sampled)

    def embedding_op(self, tokens: int) -> Op:
        op = self._vector("embedding", 0.0, 2.0 * tokens * self.model.hidden_size * ACT_BYTES)
        if self.tp > 1:  # a vocabulary-parallel embedding: each device looks up its rows, then an all-reduce
            ar = self.collective("embedding", "all_reduce", tokens * self.model.hidden_size * ACT_BYTES)
            op = Op("embedding", op.flops, op.bytes + ar.bytes, op.time_s + ar.time_s, op.bound, op.kernels + 1)
        return op

    def head_ops(self, sampled: int) -> list[Op]:
        """Final norm, LM head and sampling of the rows whose logits are needed."""
        m = self.model
        h, V = m.hidden_size, m.vocab_size
        ops = [self._vector("final_norm", 4.0 * sampled * h, 2.0 * sampled * h * ACT_BYTES + h * ACT_BYTES)]
        if sampled:
            ops.append(self._gemm("lm_head", sampled, h, V, ACT_BYTES))  # kept 16-bit under weight-only quant
            if self.tp > 1:  # each device has its share of the vocabulary's logits: gathered to sample
                ops.append(self.collective("logits_gather", "all_gather", sampled * V * self.tp * LOGIT_BYTES))
            ops.append(self._vector("sampling", 5.0 * sampled * V * self.tp, 2.0 * sampled * V * self.tp * LOGIT_BYTES))
        return ops

    def attention_decode_op(self, num_decodes: int, context_tokens: int, kv_slots: int) -> Op:
        """One layer's decode attention: every sequence reads every KV slot of its pages, including
        the unfilled tail of its last page (`kv_slots` >= `context_tokens`)."""
        flops = self._attn_flops_per_ctx * context_tokens
        nbytes = kv_slots * self._kv_read_bytes_per_slot + num_decodes * self._decode_q_bytes
        kernels = self.kernels["attention_decode"]
        t, bound = self._price(flops, nbytes, self._attn_decode_rate, kernels, self._decode_floor)
        if self._decode_table is not None:
            t = self.decode_attention_time(num_decodes, context_tokens, kv_slots)
        return Op("attention_decode", flops, nbytes, t, bound, kernels)

    def attention_prefill_op(self, chunks: Sequence[tuple[int, int]]) -> Op:
        """One layer's causal prefill attention over chunks of (new tokens c, cached context p):
        each new token attends to p plus the new tokens up to itself."""
        m = self.model
        pairs = 0.0
        kv_tokens = 0
        new = 0
        for c, p in chunks:
            pairs += c * p + c * (c + 1) / 2.0
            kv_tokens += c + p
            new += c
        flops = self._prefill_flops_per_pair * pairs
        if m.mla:  # ordinary attention over the up-projected K and V of every head
            kv_heads, v_dim = m.num_heads, m.v_head_dim
            nbytes = kv_tokens * m.num_heads * (m.head_dim + m.v_head_dim) * ACT_BYTES
        else:
            kv_heads, v_dim = m.num_kv_heads, m.head_dim
            nbytes = kv_tokens * self.kv_bytes_per_token_layer
        nbytes += new * m.num_heads * (m.head_dim + v_dim) * ACT_BYTES
        kernels = self.kernels["attention_prefill"]
        if self.tables is not None and self.tables.has_prefill:
            # each chunk at the rate flash attention reached over as many query-key pairs
            t = sum(self.tables.prefill_attention.time(m.num_heads, kv_heads, m.head_dim,
                                                        self._prefill_flops_per_pair * (c * p + c * (c + 1) / 2.0))
                    for c, p in chunks)
            return Op("attention_prefill", flops, nbytes, t, "compute", kernels)
        rate = self._flash_rate or self.attn_rate * _pad_efficiency(max(1, new), self.hw.matmul_tile_m)
        t, bound = self._price(flops, nbytes, rate, kernels, self.floor["attention_prefill"])
        return Op("attention_prefill", flops, nbytes, t, bound, kernels)

    def ops(self, num_decodes: int = 0, decode_context_tokens: int = 0, decode_kv_slots: int = 0,
            prefill_chunks: Sequence[tuple[int, int]] = (), num_sampled: int | None = None,
            all_tokens: int | None = None) -> list[Op]:
        """Every op of one iteration, per-layer ops summed over the layers (`all_tokens`: see
        _moe_ops)."""
        tokens = num_decodes + sum(c for c, _ in prefill_chunks)
        if tokens <= 0:
            raise NpusimError("an iteration needs at least one token (a decode or a prefill chunk)")
        sampled = num_decodes + len(prefill_chunks) if num_sampled is None else num_sampled
        m = self.model
        rows: dict[str, Op] = {}  # each op summed over the layers that have it (MoE layers first)
        for count, layer in self.layer_groups(tokens, all_tokens):
            for o in layer:
                rows[o.name] = _add(rows.get(o.name), o, count)
        attention = []
        if num_decodes:
            attention.append(self.attention_decode_op(num_decodes, decode_context_tokens, decode_kv_slots))
            if m.mla:
                attention.append(self.mla_absorb_op(num_decodes))
        if prefill_chunks:
            if m.mla:
                attention.append(self.kv_b_proj_op(sum(c + p for c, p in prefill_chunks)))
            attention.append(self.attention_prefill_op(prefill_chunks))
        layer = list(rows.values())
        at = next(i for i, o in enumerate(layer) if o.name == "kv_cache_write") + 1
        layer[at:at] = [_add(None, o, m.num_layers) for o in attention]
        edge = self.edge_ops(tokens, sampled)
        if self.pp > 1:  # each stage but the last sends its tokens' activations to the next
            sends = [self.pp_send_op(tokens, cross) for cross in self.cross_node]
            edge.append(Op("pp_send", 0.0, sum(o.bytes for o in sends), sum(o.time_s for o in sends), "comm",
                           len(sends)))
        return edge[:1] + layer + edge[1:]

    def pp_send_op(self, tokens: int, cross_node: bool = False) -> Op:
        """One stage's hand-over to the next: the tokens' hidden states and residual (vLLM's
        IntermediateTensors), point to point over the node's link, or the link between nodes
        where the next stage is on another node."""
        nbytes = 2.0 * tokens * self.model.hidden_size * ACT_BYTES
        hw = self.hw
        if cross_node:  # the library's cost of a message, the network's latency, its bandwidth
            t = ((hw.link_latency_us + hw.internode_latency_us) * 1e-6
                 + nbytes / (hw.internode_link_gbs * 1e9 * hw.link_efficiency))
        else:
            t = hw.link_latency_us * 1e-6 + nbytes / (hw.link_gbs * 1e9 * hw.link_efficiency)
        return Op("pp_send", 0.0, nbytes, t, "comm", 1)

    # -- the hot path ----------------------------------------------------------------------------
    def dense_time(self, tokens: int, sampled: int, all_tokens: int | None = None) -> float:
        """Seconds of every op but attention: the layers and the embedding depend on the tokens
        (and an MoE layer of data-parallel ranks on `all_tokens`, every rank's), the head on the
        sampled rows; each is memoised, since iterations repeat shapes."""
        key = tokens if all_tokens is None or self.dp_ranks == 1 else (tokens, all_tokens)
        t = self._layer_cache.get(key)
        if t is None:
            t = (sum(n * sum(o.time_s for o in ops) for n, ops in self.layer_groups(tokens, all_tokens))
                 + self.embedding_op(tokens).time_s)
            if len(self._layer_cache) >= 65536:  # bounded: lock-stepped ranks see many pairs
                self._layer_cache.clear()
            self._layer_cache[key] = t
        return t + self._head_time(sampled)

    def _head_time(self, sampled: int) -> float:
        e = self._head_cache.get(sampled)
        if e is None:
            e = self._head_cache[sampled] = sum(o.time_s for o in self.head_ops(sampled))
        return e

    def step_time(self, num_decodes: int = 0, decode_context_tokens: int = 0, decode_kv_slots: int = 0,
                  prefill_chunks: Sequence[tuple[int, int]] = (), num_sampled: int | None = None,
                  all_tokens: int | None = None) -> float:
        """Device seconds of one iteration (equal to the sum of `ops(...)`, without building them);
        `all_tokens`: every data-parallel rank's tokens in this step (see _moe_ops)."""
        tokens = num_decodes
        for c, _ in prefill_chunks:
            tokens += c
        if tokens <= 0:
            raise NpusimError("an iteration needs at least one token (a decode or a prefill chunk)")
        sampled = num_decodes + len(prefill_chunks) if num_sampled is None else num_sampled
        t = self.dense_time(tokens, sampled, all_tokens)
        if self.pp > 1:
            t += sum(self.pp_send_op(tokens, cross).time_s for cross in self.cross_node)
        return t + self.model.num_layers * self.attention_time(num_decodes, decode_context_tokens, decode_kv_slots,
                                                               prefill_chunks)

    def attention_time(self, num_decodes: int, decode_context_tokens: int, decode_kv_slots: int,
                       prefill_chunks: Sequence[tuple[int, int]]) -> float:
        """Seconds of one layer's attention (and MLA's phase-dependent GEMMs)."""
        attn = 0.0
        if num_decodes:
            attn += self.decode_attention_time(num_decodes, decode_context_tokens, decode_kv_slots)
            if self.model.mla:
                a = self._absorb_cache.get(num_decodes)
                if a is None:
                    a = self._absorb_cache[num_decodes] = self.mla_absorb_op(num_decodes).time_s
                attn += a
        if prefill_chunks:
            attn += self.attention_prefill_op(prefill_chunks).time_s
            if self.model.mla:
                attn += self.kv_b_proj_op(sum(c + p for c, p in prefill_chunks)).time_s
        return attn

    def stage_times(self, num_decodes: int = 0, decode_context_tokens: int = 0, decode_kv_slots: int = 0,
                    prefill_chunks: Sequence[tuple[int, int]] = (), num_sampled: int | None = None) -> list[float]:
        """Device seconds of each pipeline stage's kernels in one iteration: its layers, the
        embedding on the first, the head on the last, the hand-over to the next on all but the
        last. They sum to step_time(...)."""
        tokens = num_decodes + sum(c for c, _ in prefill_chunks)
        if tokens <= 0:
            raise NpusimError("an iteration needs at least one token (a decode or a prefill chunk)")
        sampled = num_decodes + len(prefill_chunks) if num_sampled is None else num_sampled
        kinds = self._kind_cache.get(tokens)
        if kinds is None:
            m = self.model
            layer = lambda moe: sum(o.time_s for o in self.layer_dense_ops(tokens, moe=moe))  # noqa: E731
            kinds = self._kind_cache[tokens] = (layer(True) if m.num_moe_layers else 0.0,
                                                layer(False) if m.num_dense_mlp_layers else 0.0,
                                                self.embedding_op(tokens).time_s,
                                                tuple(self.pp_send_op(tokens, c).time_s for c in self.cross_node))
        moe_t, dense_t, emb, sends = kinds
        attn = self.attention_time(num_decodes, decode_context_tokens, decode_kv_slots, prefill_chunks)
        head = self._head_time(sampled)
        last = len(self.stages) - 1
        return [moe * moe_t + dense * dense_t + (moe + dense) * attn + (emb if i == 0 else 0.0)
                + (head if i == last else sends[i]) for i, (moe, dense) in enumerate(self.stages)]

    def kernels_per_iteration(self, has_decode: bool, has_prefill: bool) -> int:
        """Device kernels one iteration launches (the head's only when rows are sampled)."""
        n = self._dense_kernels + self._step_kernels + (self.pp - 1)  # (+ the stages' hand-overs)
        mla = self.model.mla
        if has_decode:
            n += self.model.num_layers * (self.kernels["attention_decode"] + (self.kernels["mla_absorb"] if mla else 0))
        if has_prefill:
            n += self.model.num_layers * (self.kernels["attention_prefill"] + (self.kernels["kv_b_proj"] if mla else 0))
        return n

    def graphed(self, batch: Batch) -> bool:
        """Whether `batch` is the common case of one captured graph (launch_mode's "graph" for a
        whole-graph engine or a captured decode-only step), without working out the mode."""
        return self._graph or (not batch.prefill_chunks and batch.num_decodes <= self._decode_graph_tokens)

    def launch_mode(self, tokens: int, has_prefill: bool) -> str:
        """How the engine launches a step of `tokens` tokens: "graph" (one captured graph),
        "piecewise" (captured pieces between eagerly launched attention) or "eager". vLLM's rule:
        a step of more tokens than it captured runs eagerly; below that, a decode-only step
        replays one graph, and a step with prefill runs piecewise (full_and_piecewise), eagerly
        (full_decode_only) or as one graph (full)."""
        e = self.engine.execution
        if e != "graph":
            return e
        mode = self.graph_mode
        if mode == "none" or (self.capture_tokens is not None and tokens > self.capture_tokens):
            return "eager"
        if mode == "piecewise" or (has_prefill and mode == "full_and_piecewise"):
            return "piecewise"
        if has_prefill and mode == "full_decode_only":
            return "eager"
        return "graph"

    def host_times(self, num_sequences: int, device_s: float, has_decode: bool = True,
                   has_prefill: bool = False, tokens: int | None = None) -> tuple[float, float]:
        """(host seconds that the device waits for, seconds the device is held) of one iteration
        of `num_sequences` sequences (`tokens` tokens; default one each) whose kernels take
        `device_s` on the device.

        The engine's scheduler, input preparation and per-sequence output processing run before
        the device has work. Then, eagerly, the CPU launches kernel after kernel and the device
        runs them as they come, so the device is held for the longer of the two (a host-bound
        iteration leaves it idle between kernels); a captured graph is launched once and runs
        at device speed; piecewise graphs launch the captured pieces between eager attention.
        Which of these a step gets: launch_mode(...)."""
        host = self.host_overhead_s + self.host_per_sequence_s * num_sequences
        mode = self.launch_mode(num_sequences if tokens is None else tokens, has_prefill)
        return host, self._held(device_s, has_decode, has_prefill, 1.0, mode)

    def _held(self, device_s: float, has_decode: bool, has_prefill: bool, share: float = 1.0,
              mode: str | None = None) -> float:
        """Seconds the device is held by kernels that take `device_s`, launched as `mode` says
        (default: the engine's execution): `share` of the model's layers (a pipeline stage's;
        each stage's worker launches its own kernels)."""
        mode = mode or self.engine.execution
        if mode == "graph":
            # the replay runs while the host refreshes each layer's attention task (layer i's
            # attention waits for the i-th refresh): the longer of the two
            u = share * self.graph_update_s
            return self.graph_launch_s + (device_s if device_s > u else u)
        # launched one by one, the kernels run as they come: the device waits for the first launch,
        # then for whichever is slower, the launches or the kernels
        if mode == "eager":
            return max(device_s + self.dispatch_s,
                       share * self.kernels_per_iteration(has_decode, has_prefill) * self.dispatch_s)
        # piecewise: one graph per layer between attention calls, attention launched eagerly
        L = self.model.num_layers * share
        eager_kernels = L * ((self.kernels["attention_decode"] if has_decode else 0)
                             + (self.kernels["attention_prefill"] if has_prefill else 0))
        return max(device_s + self.graph_launch_s, (L + 1) * self.graph_launch_s + eager_kernels * self.dispatch_s)

    def price_stages(self, batch: Batch) -> tuple[float, list[float], float, bool]:
        """price(...) of a pipeline: (host, seconds each stage's devices are held, swap,
        host_bound). The scheduler's host work comes before the first stage."""
        decodes, chunks = batch.num_decodes, batch.prefill_chunks
        host = self.host_overhead_s + self.host_per_sequence_s * (decodes + len(chunks))
        swap = batch.swap_bytes / self.host_link_bytes_per_s if batch.swap_bytes else 0.0
        if not (decodes or chunks):
            return self.host_overhead_s, [0.0] * self.pp, swap, True
        kernels = self.stage_times(decodes, batch.decode_context_tokens, batch.decode_kv_slots, chunks,
                                   batch.num_sampled)
        L = self.model.num_layers
        mode = self.launch_mode(batch.num_tokens, bool(chunks))
        held = [self._held(t, bool(decodes), bool(chunks), (moe + dense) / L, mode)
                for t, (moe, dense) in zip(kernels, self.stages)]
        busy = sum(kernels)
        return host, held, swap, host + sum(held) - busy > busy

    def price(self, batch: Batch, all_tokens: int | None = None,
              mode: str | None = None) -> tuple[float, float, float, bool]:
        """(host, device, swap, host_bound) of one iteration: seconds of host work the device waits
        for, seconds the device is held (its kernels, or their eager launches when those take
        longer), seconds of KV pages copied over the host link before it runs, and whether the
        host's share (its work and any launches the kernels wait for) exceeds the kernels' own
        time. A batch with no tokens (everything in it was preempted) costs host and swap time.
        `all_tokens`: every data-parallel rank's tokens in this step, whose experts' work this
        rank's devices share (not given: each rank's like this one's). `mode`: how the step is
        launched (launch_mode's word), where the caller decides it (data-parallel ranks in lock
        step launch alike); not given: launch_mode(...) of this batch."""
        device = 0.0
        decodes, chunks = batch.num_decodes, batch.prefill_chunks
        if decodes or chunks:
            device = self.step_time(decodes, batch.decode_context_tokens, batch.decode_kv_slots,
                                    chunks, batch.num_sampled, all_tokens)
            kernels_s = device
            host = self.host_overhead_s + self.host_per_sequence_s * (decodes + len(chunks))
            if mode is None and self.graphed(batch):
                # (the common case, inlined: _held says the same)
                device = self.graph_launch_s + (device if device > self.graph_update_s else self.graph_update_s)
            else:
                device = self._held(device, bool(decodes), bool(chunks), 1.0,
                                    mode or self.launch_mode(batch.num_tokens, bool(chunks)))
            host_bound = host + device - kernels_s > kernels_s
        else:
            host, host_bound = self.host_overhead_s, True
        swap = batch.swap_bytes / self.host_link_bytes_per_s if batch.swap_bytes else 0.0
        return host, device, swap, host_bound

    def decode_attention_time(self, num_decodes: int, context_tokens: int, kv_slots: int) -> float:
        """Inlined twin of attention_decode_op(...).time_s for the hot path; a test keeps them equal."""
        if self._decode_table is not None:
            key = (num_decodes, kv_slots)
            t = self._decode_cache.get(key)
            if t is None:
                # the measured kernel at this batch, each sequence reading its mean pages, never
                # below its kernels' least time
                t = self._decode_table.time(*self._decode_layout, self.block_size, num_decodes,
                                            kv_slots / num_decodes)
                if self._kv_table_scale != 1.0:
                    # timed with a 16-bit cache: an 8-bit one saves the time of the bytes it does
                    # not read (at the device's streaming rate), never more than that share
                    t = max(t * self._kv_table_scale, t - kv_slots * self._kv_unread_bytes_per_slot / self.bw)
                t = max(t, self._decode_kernels * self._decode_floor)
                if len(self._decode_cache) >= 65536:  # bounded: a long run sees many shapes
                    self._decode_cache.clear()
                self._decode_cache[key] = t
            return t
        tc = self._attn_flops_per_ctx * context_tokens / self._attn_decode_rate
        tm = (kv_slots * self._kv_read_bytes_per_slot + num_decodes * self._decode_q_bytes) / self.bw
        t = tc if tc > tm else tm
        k = self._decode_kernels
        if not k:
            return t
        f = self._decode_floor
        return (t if t > f else f) + (k - 1) * f


# --------------------------------------------------------------------------- memory

@dataclass(frozen=True)
class MemoryPlan:
    """Where device memory goes, and how many KV blocks are left, computed as vLLM does."""

    device_bytes: float
    usable_bytes: float  # device × gpu_memory_utilization
    weight_bytes: float
    activation_bytes: float
    reserve_bytes: float
    kv_pool_bytes: float
    block_size: int
    block_bytes: float
    kv_bytes_per_token: float
    num_blocks_formula: int
    num_blocks: int  # the formula's, or the measured override
    fits: bool
    verdict: str

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def as_dict(self) -> dict:
        g = lambda b: round(gib(b), 3)  # noqa: E731
        return {
            "device_gib": g(self.device_bytes), "usable_gib": g(self.usable_bytes),
            "weights_gib": g(self.weight_bytes), "activation_peak_gib": g(self.activation_bytes),
            "runtime_reserve_gib": g(self.reserve_bytes), "kv_pool_gib": g(self.kv_pool_bytes),
            "kv_bytes_per_token": self.kv_bytes_per_token, "block_size": self.block_size,
            "block_bytes": self.block_bytes, "num_blocks_formula": self.num_blocks_formula,
            "num_blocks": self.num_blocks, "kv_capacity_tokens": self.kv_capacity_tokens,
            "fits": self.fits, "verdict": self.verdict,
        }


def activation_peak_bytes(model: ModelSpec, max_num_batched_tokens: int, max_num_seqs: int) -> float:
    """Estimate of vLLM's profiled activation peak: a forward pass of max_num_batched_tokens holding
    the MLP input, gate/up output and activation output at once, plus fp32 logits (and a softmax
    copy) for max_num_seqs sampled rows."""
    T, h, f = max_num_batched_tokens, model.hidden_size, model.mlp_act_width
    mlp = T * (2 * h + 3 * f) * ACT_BYTES
    logits = 2.0 * min(max_num_seqs, T) * model.vocab_size * LOGIT_BYTES
    return mlp + logits


def memory_plan(hw: HardwareSpec, model: ModelSpec, engine: EngineConfig | None = None,
                memory_fraction: float = 1.0) -> MemoryPlan:
    """KV blocks left for one instance owning `memory_fraction` of the device's memory:
    (memory × utilisation − weights − activation peak − runtime reserve) // block bytes. Under
    pipeline parallelism each stage's device holds its layers' weights and KV: the stage with the
    fewest blocks sets the pool (vLLM takes the least over its workers)."""
    e = engine or EngineConfig()
    if None in (e.block_size, e.max_num_seqs, e.max_num_batched_tokens, e.gpu_memory_utilization):
        _, e = resolve_engine(hw, e)
    pp = e.pipeline_parallel_size
    if pp == 1:
        return _memory_plan(hw, model, e, memory_fraction, model.weight_bytes(e.weight_dtype),
                            model.kv_bytes_per_token(e.kv_dtype))
    plans = []
    layers = [moe + dense for moe, dense in pp_stages(model, pp)]
    for i, (w, n) in enumerate(zip(pp_stage_weight_bytes(model, e.weight_dtype, pp), layers)):
        plan = _memory_plan(hw, model, e, memory_fraction, w, model.kv_bytes_per_token(e.kv_dtype) * n / model.num_layers)
        plans.append(replace(plan, verdict=f"(stage {i + 1} of {pp}, {n} layers, the tightest) {plan.verdict}"))
    return min(plans, key=lambda p: (p.fits, p.num_blocks))


def _memory_plan(hw: HardwareSpec, model: ModelSpec, e: EngineConfig, memory_fraction: float, weights: float,
                 kv_per_token: float) -> MemoryPlan:
    device = hw.memory_bytes * memory_fraction
    usable = device * e.gpu_memory_utilization
    act = activation_peak_bytes(model, e.max_num_batched_tokens, e.max_num_seqs)
    reserve = hw.runtime_reserve_gib * 2**30
    block_bytes = kv_per_token * e.block_size
    pool = usable - weights - act - reserve
    formula = max(0, int(pool // block_bytes))
    num_blocks = e.num_blocks if e.num_blocks is not None else formula
    need = weights + act + reserve
    g = lambda b: f"{gib(b):.2f} GiB"  # noqa: E731
    if formula <= 0 and e.num_blocks is None:
        verdict = (f"does not fit: {model.name} weights {g(weights)} ({e.weight_dtype}) + activations "
                   f"{g(act)} (for max_num_batched_tokens {e.max_num_batched_tokens}, max_num_seqs "
                   f"{e.max_num_seqs}) + runtime reserve {g(reserve)} = {g(need)} exceed the usable {g(usable)} "
                   f"({g(device)} x {e.gpu_memory_utilization}) by {g(need - usable + block_bytes)} "
                   f"(room for not even one {e.block_size}-token KV block)")
        fits = False
    elif e.num_blocks is not None and num_blocks * block_bytes > device - weights:
        most = int((device - weights) // block_bytes)
        verdict = (f"does not fit: num_blocks {num_blocks} x {e.block_size} tokens need "
                   f"{g(num_blocks * block_bytes)} of KV cache, but {g(device)} of device memory less "
                   f"{model.name}'s weights {g(weights)} hold at most {most} blocks "
                   f"(the formula gives {formula})")
        fits = False
    else:
        fits = True
        verdict = (f"fits: {num_blocks} KV blocks of {e.block_size} tokens = {num_blocks * e.block_size} "
                   f"tokens ({g(num_blocks * block_bytes)}) after weights {g(weights)}, activations "
                   f"{g(act)}, reserve {g(reserve)}")
    return MemoryPlan(device, usable, weights, act, reserve, pool, e.block_size, block_bytes,
                      kv_per_token, formula, num_blocks, fits, verdict)


# --------------------------------------------------------------------------- one instance

@dataclass(frozen=True)
class InstanceSetup:
    """What one of K instances on a device runs on, what an iteration costs there, and its memory."""

    hw: HardwareSpec  # the whole device, or the vNPU partition the instance owns
    cost: CostModel
    plan: MemoryPlan
    usable_blocks: int  # blocks a request may hold: the pool less the admission watermark
    engine: EngineConfig  # the settings, the engine profile's defaults filled in
    profile: EngineProfile


def instance_hardware(hw: HardwareSpec, instances: int, sharing: str) -> HardwareSpec:
    """What one of K instances runs on: the whole device when time-sliced, a vNPU partition of
    ai_cores // K cores (with the bandwidth they can pull and 1/K of the memory) otherwise. A single
    instance owns the whole device whatever the mode."""
    if instances < 1:
        raise NpusimError(f"instances must be >= 1, got {instances}")
    if sharing not in ("time-slice", "vnpu"):
        raise NpusimError(f"sharing must be time-slice or vnpu, got {sharing!r}")
    if instances == 1 or sharing == "time-slice":
        return hw
    if instances > hw.ai_cores:
        raise NpusimError(f"--instances {instances} exceeds {hw.name}'s {hw.ai_cores} AI cores "
                          f"for vnpu sharing")
    return hw.partition(hw.ai_cores // instances, 1.0 / instances)


def instance_setup(hw: HardwareSpec, model: ModelSpec, engine: EngineConfig, instances: int = 1,
                   sharing: str = "time-slice") -> InstanceSetup:
    """One instance of K: its hardware, engine, cost model and memory plan (1/K of the device's
    memory in either mode). The plan says whether it fits; callers decide what a misfit means."""
    profile, engine = resolve_engine(hw, engine)
    tp, ep, pp = engine.tensor_parallel_size, engine.expert_parallel_size, engine.pipeline_parallel_size
    if engine.expert_imbalance is not None and ep == 1:
        raise NpusimError(f"--expert-imbalance {engine.expert_imbalance:g} is the busiest expert-parallel device's "
                          "load over the mean: it needs --ep > 1")
    if ep > 1:
        if not model.num_experts:
            raise NpusimError(f"--ep {ep}: {model.name} has no experts (a dense model)")
        if ep % tp:
            raise NpusimError(f"--ep {ep} with --tp {tp}: the experts run over the tensor-parallel group (--ep {tp}) "
                              f"or over whole groups of data-parallel ranks (a multiple of {tp})")
        if model.num_experts % ep:
            raise NpusimError(f"--ep {ep}: {model.name}'s {model.num_experts} experts do not divide among {ep} devices")
        if ep > hw.node_devices:
            # the experts' all-to-all may cross nodes (vLLM's multi-node DP with EP); each rank's
            # tensor-parallel group stays within one
            if hw.internode_link_gbs is None:
                raise NpusimError(f"--ep {ep} exceeds the {hw.node_devices} devices of one {hw.name} node "
                                  f"(node_devices), and its profile has no link between nodes (internode_link_gbs)")
            if ep % hw.node_devices or (hw.node_devices % tp and tp % hw.node_devices):
                raise NpusimError(f"--ep {ep} exceeds the {hw.node_devices} devices of one {hw.name} node: across "
                                  f"nodes it must fill whole nodes (a multiple of {hw.node_devices}), each rank's "
                                  f"--tp {tp} devices within a node or filling whole ones")
        if ep > tp and instances > 1:
            raise NpusimError(f"--ep {ep} with --instances {instances}: expert-parallel ranks each own their devices")
        if ep > tp and pp > 1:
            raise NpusimError(f"--pp {pp} with data-parallel experts (--ep {ep} --tp {tp}): ranks in lock step "
                              "through pipeline stages are not modelled")
    if tp > 1:
        if tp > hw.node_devices:  # across nodes: whole nodes, collectives hierarchical
            if hw.internode_link_gbs is None:
                raise NpusimError(f"--tp {tp} exceeds the {hw.node_devices} devices of one {hw.name} node "
                                  f"(node_devices), and its profile has no link between nodes (internode_link_gbs)")
            if tp % hw.node_devices:
                raise NpusimError(f"--tp {tp} exceeds the {hw.node_devices} devices of one {hw.name} node: across "
                                  f"nodes it must fill whole nodes (a multiple of {hw.node_devices})")
        if instances > 1:
            raise NpusimError(f"--tp {tp} with --instances {instances}: an instance spanning devices does not "
                              f"share them with another; run one instance per device group")
        model = tp_shard(model, tp)  # (what each device holds and computes)
    if ep > tp:  # ep / tp data-parallel ranks of tp devices each: attention per rank, E/ep experts a device
        model = ep_shard(model, ep // tp, ep)
    if pp > 1:
        pp_stages(model, pp)  # (refuses more stages than layers)
        if tp * pp > hw.node_devices:
            if hw.internode_link_gbs is None:
                raise NpusimError(f"--pp {pp} x --tp {tp} = {tp * pp} devices exceed the {hw.node_devices} of one "
                                  f"{hw.name} node (node_devices), and its profile has no link between nodes "
                                  f"(internode_link_gbs)")
            if hw.node_devices % tp and tp % hw.node_devices:
                raise NpusimError(f"--pp {pp} x --tp {tp} spans nodes of {hw.node_devices} devices, which --tp {tp} "
                                  f"neither divides nor fills: a stage's tensor-parallel group would straddle two nodes")
        if instances > 1:
            raise NpusimError(f"--pp {pp} with --instances {instances}: a pipeline spans devices of its own; "
                              "run one instance")
    part = instance_hardware(hw, instances, sharing)
    if part is hw:
        plan = memory_plan(hw, model, engine, memory_fraction=1.0 / instances)
    else:
        plan = memory_plan(part, model, engine)
    cost = CostModel(part, model, engine.weight_dtype, engine.kv_dtype, profile, engine.block_size, tp, ep, pp,
                     engine.expert_imbalance, engine.cudagraph_mode, engine.max_cudagraph_capture_size)
    usable = plan.num_blocks - int(engine.watermark * plan.num_blocks) if plan.fits else 0
    return InstanceSetup(part, cost, plan, usable, engine, profile)


__all__ = ["Op", "Batch", "CostModel", "MemoryPlan", "memory_plan", "activation_peak_bytes",
           "InstanceSetup", "instance_hardware", "instance_setup", "DTYPE_BYTES"]
