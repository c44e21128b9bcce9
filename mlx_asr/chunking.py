"""Long audio: the official split at a low-energy boundary near every ``max_seconds``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import SAMPLE_RATE

MAX_SECONDS = 1200.0  # the official single-inference limit (20 min)
MIN_PIECE_SECONDS = 0.5
SEARCH_SECONDS = 5.0
ENERGY_WINDOW_SECONDS = 0.1


@dataclass(frozen=True)
class Piece:
    """A piece of a long recording and where it starts."""

    samples: np.ndarray
    offset: float


def _boundary(wav: np.ndarray, start: int, cut: int) -> int:
    """Sample index of the quietest point within +-5 s of ``cut`` (official search)."""
    expand = int(SEARCH_SECONDS * SAMPLE_RATE)
    win = max(4, int(ENERGY_WINDOW_SECONDS * SAMPLE_RATE))
    left, right = max(start, cut - expand), min(wav.shape[0], cut + expand)
    if right - left <= win:
        return cut
    seg = np.abs(wav[left:right])
    sums = np.convolve(seg, np.ones(win, dtype=np.float32), mode="valid")
    pos = int(np.argmin(sums))
    return left + pos + int(np.argmin(seg[pos : pos + win]))


def split_audio(wav: np.ndarray, max_seconds: float = MAX_SECONDS) -> list[Piece]:
    """Cut 16 kHz audio longer than ``max_seconds`` into pieces as the official package does.

    Audio within the limit is returned whole and unpadded. Otherwise pieces end at low-energy
    points, cover the audio exactly, and pieces shorter than 0.5 s are zero-padded to 0.5 s.
    """
    wav = np.asarray(wav, dtype=np.float32)
    total = wav.shape[0]
    if total / SAMPLE_RATE <= max_seconds:
        return [Piece(wav, 0.0)]
    max_len = int(max_seconds * SAMPLE_RATE)
    bounds, start = [], 0
    while total - start > max_len:
        end = min(max(_boundary(wav, start, start + max_len), start + 1), total)
        bounds.append((start, end))
        start = end
    bounds.append((start, total))
    min_len = int(MIN_PIECE_SECONDS * SAMPLE_RATE)
    pieces = []
    for a, b in bounds:
        piece = wav[a:b]
        if piece.shape[0] < min_len:
            piece = np.pad(piece, (0, min_len - piece.shape[0]))
        pieces.append(Piece(piece, a / SAMPLE_RATE))
    return pieces
