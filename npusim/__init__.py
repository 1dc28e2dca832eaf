"""npusim: paged KV-cache memory and accelerator throughput for LLM serving, Ascend NPUs first."""

from npusim.errors import NpusimError

__version__ = "0.1.0"
__all__ = ["NpusimError", "__version__"]
