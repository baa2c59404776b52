"""splitserve's C++ CPU kernels (engine/kernels/csrc/), compiled for this machine on first use and cached.

One extension holds them all, one source file per kernel (each header comment has its design and figures): decode
attention (paged_decode_cpu.cpp, paged_decode_avx512.cpp), prefill attention (paged_prefill_cpu.cpp), the decoder's
fused elementwise ops (fused_ops_cpu.cpp: rms_norm, add + rms_norm, silu_and_mul, rotary) and the K/V store
(store_kv_cpu.cpp); bindings.cpp binds them to Python. It is built with torch's cpp_extension (g++ and ninja, OpenMP)
for the host's own instruction set (-march=native) into torch's extension cache (~/.cache/torch_extensions, or
$TORCH_EXTENSIONS_DIR), keyed by a hash of the sources, their folder and the flags, so an edit rebuilds it and other
processes reuse the build. `make install` builds it once (`main()`), so servers do not compile while
serving. Where it cannot be built (no compiler), or with SPLITSERVE_NATIVE_KERNELS=0, the torch ops serve instead;
the reason is logged once.

A build holds a lock file in its folder while it runs, and torch makes every other process wait, with no deadline,
until that file is gone. A build killed midway (a test's cluster stopped while a node was compiling) leaves the file
behind, and every later start would hang on it. So before a build, a lock whose folder has seen no progress (no file
written) for STALE_LOCK_S is removed: a live build writes an object file at least every minute or two.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

_SOURCE_DIR = Path(__file__).with_name("csrc")
# -ffast-math: reductions (dot products, sums) vectorise only when the compiler may reassociate them, and glibc's
# vector exp is used only under it. The kernel never makes an infinity or a NaN of its own (softmax starts from the
# first score, not -inf), so finite-math assumptions hold for finite inputs.
# -fopenmp: at::parallel_for is inline in ATen's headers and runs its body on the calling thread alone unless the
# including file is compiled with OpenMP; with it, the kernels share torch's own OpenMP runtime (libgomp) and
# torch.set_num_threads sizes them too (measured: decode attention 2.0 -> 0.75 ms a layer on 2 cores).
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
DISABLE_ENV = "SPLITSERVE_NATIVE_KERNELS"
STALE_LOCK_S = 300.0

_lock = threading.Lock()
_loaded: ModuleType | None = None
_failed: str | None = None
_log = logging.getLogger(__name__)


def native() -> ModuleType | None:
    """The compiled kernels, built on first call; None when they are disabled or cannot be built (logged once)."""
    global _loaded, _failed
    if _loaded is not None or _failed is not None:
        return _loaded
    with _lock:
        if _loaded is None and _failed is None:
            try:
                _loaded = _build()
            except Exception as exc:  # no compiler, a failed build: the torch ops serve instead
                _failed = f"{type(exc).__name__}: {exc}"
                _log.warning(
                    "CPU kernels not built (%s); using torch ops for decode attention", _failed[:500]
                )
    return _loaded


def _build() -> ModuleType:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        raise RuntimeError(f"disabled by {DISABLE_ENV}=0")
    from torch.utils import cpp_extension

    # The ninja of this virtualenv (the `ninja` package) may not be on PATH when python is run without activating it.
    scripts = str(Path(sys.executable).parent)
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")
    sources = sorted(_SOURCE_DIR.glob("*.cpp"))
    # The sources' paths are in the key too: torch's build files name them, so two checkouts sharing one cache
    # would otherwise rebuild each other's kernels over and over.
    key = " ".join(_FLAGS).encode() + str(_SOURCE_DIR.resolve()).encode()
    for path in sorted(_SOURCE_DIR.iterdir()):
        key += path.name.encode() + path.read_bytes()
    digest = hashlib.sha256(key).hexdigest()[:12]
    name = f"splitserve_cpu_kernels_{digest}"
    wait_for_build_lock(Path(cpp_extension._get_build_directory(name, verbose=False)))
    return cpp_extension.load(
        name=name,
        sources=[str(path) for path in sources],
        extra_cflags=_FLAGS,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(_SOURCE_DIR)],
        verbose=False,
    )


def wait_for_build_lock(build_dir: Path, stale_s: float = STALE_LOCK_S, poll_s: float = 1.0) -> None:
    """Wait while another process builds here; remove its lock once the folder has made no progress for stale_s.

    Returns when there is no lock (torch then takes it and builds, or loads the finished build); a build that
    another process starts in between is waited for by torch as before."""
    lock = build_dir / "lock"
    while lock.exists():
        try:
            last_write = max(path.stat().st_mtime for path in build_dir.iterdir())
        except (FileNotFoundError, ValueError):  # the build finished (or the folder emptied) while we looked
            continue
        if time.time() - last_write > stale_s:
            _log.warning(
                "removing the build lock %s: no progress for %.0f s (its build was killed)", lock, stale_s
            )
            lock.unlink(missing_ok=True)
            return
        time.sleep(poll_s)


def main() -> None:
    """`make install`: build once, ahead of any server (a failure is reported, not fatal: torch ops serve)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print("CPU kernels:", "built" if native() is not None else f"not built ({_failed}); torch ops will serve")
