"""PyTorch backend (CPU, CUDA): log-mel, audio encoder, Qwen3 decoder, optional int8/int4 weights."""

from .openmp import configure_openmp

configure_openmp()  # before PyTorch loads: short OpenMP spinning, so shared cores do not stall decoding

from .backend import TorchBackend  # noqa: E402

__all__ = ["TorchBackend"]
