"""A request inside the engine: its progress, its timestamps and, while it decodes, its place in
the decode set."""

from __future__ import annotations

import math
from enum import Enum

from npusim.workload import RequestSpec


class State(Enum):
    WAITING = "waiting"  # queued, holding no KV (new, or preempted to be recomputed)
    PREFILL = "prefill"  # running, advanced one chunk at a time by the scheduler
    DECODE = "decode"  # running, in the decode set: one token per iteration
    SWAPPED = "swapped"  # preempted, its KV pages in host memory
    DONE = "done"


class Request:
    """Every request has `num_tokens` known tokens (prompt + generated so far) and `num_computed` of
    them in the KV cache; an iteration gives a scheduled request some of the difference (a prefill
    chunk, or the one token of a decode), and when its cache catches up with its tokens it samples
    the next one. Recompute preemption and chunked prefill fall out of the same rule."""

    __slots__ = ("id", "arrival", "prompt_len", "output_len", "prefix_group", "prefix_len",
                 "submit", "num_tokens", "num_computed", "out_done", "t_first", "t_last", "t_done",
                 "preemptions", "hashes", "on_done", "state", "seq",
                 "joined_it", "joined_computed", "joined_out", "kv_tokens", "kv_slots", "ticket")

    def __init__(self, spec: RequestSpec):
        self.id = spec.id
        self.arrival = spec.arrival
        self.prompt_len = spec.prompt_len
        self.output_len = spec.output_len
        self.prefix_group = spec.prefix_group
        self.prefix_len = spec.prefix_len
        self.submit = spec.arrival  # when the client sent it: latencies count from here
        self.num_tokens = spec.prompt_len
        self.num_computed = 0
        self.out_done = 0
        self.t_first = math.nan
        self.t_last = math.nan
        self.t_done = math.nan
        self.preemptions = 0
        self.hashes: list[int] | None = None
        self.on_done = None
        self.state = State.WAITING
        self.seq = 0  # admission order: the newest running request is preempted first
        # In the decode set, a member's own counters are stale between its events. They are:
        self.joined_it = 0  # iterations the instance had done when the member joined the set
        self.joined_computed = 0  # its num_computed then (and joined_out: its out_done then)
        self.joined_out = 0
        self.kv_tokens = 0  # tokens the KV pool holds for it (may lead or lag num_computed)
        self.kv_slots = 0  # KV slots its decode reads: its whole pages
        self.ticket = 0  # bumped on joining and leaving, so that stale events are skipped

    def block_hashes(self, block_size: int) -> list[int]:
        """Hashes of the full blocks of the prompt: blocks inside a shared prefix hash by (group,
        index), so requests of one group share them; later blocks are this request's own."""
        n_full = self.prompt_len // block_size
        shared = self.prefix_len // block_size if self.prefix_group >= 0 else 0
        return [hash(("g", self.prefix_group, i)) if i < shared else hash(("r", self.id, i))
                for i in range(n_full)]
