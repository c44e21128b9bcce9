"""PyTorch backend (CPU, CUDA): log-mel, audio encoder, Qwen3 decoder, optional int8/int4 weights."""

from .backend import TorchBackend

__all__ = ["TorchBackend"]
