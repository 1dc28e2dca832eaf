"""Schedulers: which requests run in the next iteration, with which KV pages.

`schedule()` returns the iteration's `Batch` (the only thing the cost model prices) and
`complete(batch, now)` applies its outcome, as vLLM v1's `schedule()` / `update_from_output()`."""

from npusim.sched.continuous import ContinuousScheduler, SchedulerStats
from npusim.sched.decode_set import DecodeSet
from npusim.sched.pools import ContiguousPool, PagedPool
from npusim.sched.request import Request, State
from npusim.sched.static import StaticScheduler

__all__ = ["ContinuousScheduler", "StaticScheduler", "SchedulerStats", "DecodeSet", "PagedPool",
           "ContiguousPool", "Request", "State"]
