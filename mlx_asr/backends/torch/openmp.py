"""How PyTorch's OpenMP worker threads wait for work; set before PyTorch is imported (this module imports no torch).

PyTorch's CPU wheels run their thread pool on GNU OpenMP (libgomp). By default an idle libgomp worker spins
for ~300 000 iterations (milliseconds) before it sleeps. On idle cores that saves a wake-up per parallel
region; but when other processes share the cores, the spinning workers take CPU from our own main thread
and from the other processes, and every parallel region then waits for a descheduled worker. Measured on
2 shared cores (0.6B, int8): decoding went from ~26 ms/token on idle cores to 200-1500 ms/token while other
jobs ran, against 75-100 ms/token with short spinning; quantizing at load time was 5x slower. The price on
idle cores (w8a8 decode-only loop): 48-56 ms/token at 1000 spins, 42-45 ms at 10000; beside another PyTorch
process, 69-79 ms at 1000 and 85-159 ms at 10000.

So, unless the user chose a policy (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` in the environment), the torch
backend sets ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` before PyTorch loads. It only works if PyTorch was not
imported yet (libgomp reads its settings once, when it is loaded); the CLI and ``AsrPipeline`` import this
module first. ``MLX_ASR_OMP_SPIN=default`` keeps libgomp's own default; ``MLX_ASR_OMP_SPIN=N`` sets N.

The count was 1000 until the backend learnt to run on the cores other processes leave free (:mod:`.cores`):
beside a busy process it now runs one thread, whose workers never wait, so the count only matters on free
cores, where the long spin is the fast one. Measured with w8a8 + quantize_audio (0.6B, 10 s clip, 40 tokens,
2 Zen 4 cores): at 10000 spins 36.2-39.6 ms/token (RTF 0.191-0.208) on idle cores against 43-45 (0.222-0.236)
at 1000, and beside one busy process RTF 0.29-0.31 (one thread) against 0.70-0.75 on two threads.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = 10_000  # iterations a worker spins before it sleeps (libgomp's default: 300000)
LIBGOMP_SPIN_COUNT = 300_000
LONG_SPIN = 10_000  # from this many spins on, a worker is still awake for the next kernel of a decoding step
USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def configure_openmp() -> str | None:
    """Set ``GOMP_SPINCOUNT`` for PyTorch's OpenMP pool if it is still possible and the user set nothing.

    Returns the value set, or ``None`` when nothing was changed.
    """
    if "torch" in sys.modules or any(os.environ.get(key) for key in USER_KEYS):
        return None
    choice = os.environ.get("MLX_ASR_OMP_SPIN", "").strip().lower()
    if choice == "default":
        return None
    value = choice if choice.isdigit() else str(SPIN_COUNT)
    os.environ["GOMP_SPINCOUNT"] = value
    return value


def workers_spin() -> bool:
    """Whether idle OpenMP workers spin long enough to be awake for the next small kernel (from the environment).

    As libgomp decides: ``GOMP_SPINCOUNT`` when it is set (at least :data:`LONG_SPIN` spins), else
    ``OMP_WAIT_POLICY`` (``active`` spins, ``passive`` does not), else libgomp's default, which spins (the
    case where PyTorch was loaded before :func:`configure_openmp` could set anything).
    """
    count = os.environ.get("GOMP_SPINCOUNT", "").strip().lower()
    scale = _SUFFIXES.get(count[-1:], 1)
    digits = count[:-1] if count[-1:] in _SUFFIXES else count
    if count.startswith("infinit"):
        return True
    if digits.isdigit():
        return int(digits) * scale >= LONG_SPIN
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip().lower()  # no (valid) count: libgomp's defaults
    if policy in ("active", "passive"):
        return policy == "active"
    return LIBGOMP_SPIN_COUNT >= LONG_SPIN
