"""MLX backend (Apple Silicon Metal, or MLX's CPU backend). Importing this package imports ``mlx``."""

from .backend import MlxBackend

__all__ = ["MlxBackend"]
