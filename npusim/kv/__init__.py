"""KV-cache memory models: paged (PagedAttention) and contiguous allocators, and their metrics."""

from npusim.kv.contiguous import ContiguousKVCache
from npusim.kv.metrics import MemoryTimeline, waste_fraction
from npusim.kv.paged import PagedKVCache

__all__ = ["ContiguousKVCache", "MemoryTimeline", "PagedKVCache", "waste_fraction"]
