"""The device kosmo computes on and the float type it computes in, decided in this one place.

`precision="auto"` (every default) runs bf16 autocast only where the hardware does bf16 matmuls
natively: a CUDA GPU with bf16 (Ampere and later), or a CPU with AMX or AVX-512-BF16 whose kernels
may use them. Elsewhere it runs fp32, because there bf16 is emulated and runs tens to hundreds of
times slower than fp32 (`benchmarks/precision.py` measures both on the machine it runs on).
Training stages, `kosmo generate`, `kosmo eval`, the serving engine and `kosmo demo` all ask here.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path

import torch

from kosmo.errors import KosmoError

PRECISIONS = ("auto", "bf16", "fp32")


def pick_device(pref: str = "auto") -> torch.device:
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(pref)
    except RuntimeError:
        raise KosmoError(f"--device: {pref!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise KosmoError(f"--device: {pref} is not available on this machine")
    return device


def cpu_capability() -> str:
    """The vector ISA that PyTorch's CPU kernels dispatch to (AVX2, AVX512, ...); ATEN_CPU_CAPABILITY lowers it."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_flags() -> frozenset[str]:
    """The CPU's bf16 features, read from cpuinfo through PyTorch, else from /proc/cpuinfo."""
    cpu = torch.cpu
    if hasattr(cpu, "_is_avx512_bf16_supported") and hasattr(cpu, "_is_amx_tile_supported"):
        return frozenset(name for name, has in (("avx512_bf16", cpu._is_avx512_bf16_supported()),
                                                ("amx_bf16", cpu._is_amx_tile_supported())) if has)
    info = Path("/proc/cpuinfo")
    words = set(info.read_text().split()) if info.is_file() else set()
    return frozenset(words & {"avx512_bf16", "amx_bf16"})


def _onednn_bf16() -> bool:
    """Whether oneDNN, which runs CPU bf16 matmuls, may use bf16 instructions (ONEDNN_MAX_CPU_ISA can forbid it)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None and torch.backends.mkldnn.is_available() else False


@functools.cache
def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware on `device` rather than emulated (asked once per device:
    autocast contexts ask at every step)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_capability().startswith("AVX512") and bool(cpu_flags()) and _onednn_bf16()
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`, `bf16` or `fp32` -> the precision to run: `bf16` or `fp32`. Forcing bf16 where the
    hardware emulates it is allowed, with one warning that says how much slower it runs."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return precision
    native = native_bf16(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    if not native:
        _warn_emulated(device.type)
    return precision


@functools.cache
def _warn_emulated(device_type: str):
    """One line on stderr, once per process and device type."""
    if device_type == "cpu":
        where = f"this CPU ({cpu_capability()} kernels): a bf16 matmul measured {bf16_slowdown():.0f}x slower than fp32"
    else:
        where = f"this {device_type}"
    print(f"kosmo: warning: bf16 is emulated on {where}; precision=auto would pick fp32", file=sys.stderr)


@functools.cache
def bf16_slowdown(n: int = 256) -> float:
    """Time of an n x n matmul in bf16 over the same in fp32 on this CPU, the best of several runs each."""
    def best(dtype):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        times, start = [], time.perf_counter()
        while len(times) < 3 or (len(times) < 50 and time.perf_counter() - start < 0.2):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)
    return best(torch.bfloat16) / best(torch.float32)


def matmul_peak(device: torch.device, precision: str) -> float:
    """FLOP/s of a large square matmul on `device` at `precision`: the peak that training's MFU is
    measured against. Measured once per device, precision and thread count, then kept in
    $KOSMO_CACHE (default ~/.cache/kosmo)/matmul_peak.json."""
    precision = resolve_precision(precision, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    key = f"{name} | {precision} | {torch.get_num_threads() if device.type == 'cpu' else 'gpu'} threads | per core"
    store = Path(os.environ.get("KOSMO_CACHE", Path.home() / ".cache" / "kosmo")) / "matmul_peak.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        known[key] = _measure_matmul(device, dtype) if device.type == "cuda" else _cpu_peak(dtype)
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            tmp = store.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(store)
        except OSError:
            pass  # a read-only home measures again next time
    return known[key]


def _cpu_peak(dtype: torch.dtype) -> float:
    """One core's matmul FLOP/s times the threads training uses. The core is timed by its own thread's
    CPU time, so other jobs on a shared host, which take turns on the cores, do not lower the peak."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return threads * _measure_matmul(torch.device("cpu"), dtype, clock=time.thread_time)
    finally:
        torch.set_num_threads(threads)


def _measure_matmul(device: torch.device, dtype: torch.dtype, clock=time.perf_counter) -> float:
    """The best FLOP/s of n x n matmuls, n doubled from 256 while one takes under 50 ms (up to 2048 on a
    CPU, 8192 on a GPU), so a slow (emulated) dtype is measured small rather than for minutes."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n, largest, best = 256, 8192 if device.type == "cuda" else 2048, 0.0
    while True:
        gen = torch.Generator(device).manual_seed(0)  # the global RNG is the run's: leave it untouched
        a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2))
        a @ b  # warm-up: kernel choice, allocation
        times = []
        for _ in range(5):
            sync()
            t0 = clock()
            a @ b
            sync()
            times.append(clock() - t0)
        best = max(best, 2 * n**3 / min(times))
        if n >= largest or min(times) > 0.05:
            return best
        n *= 2


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision (`auto` resolved for `device`); fp32 turns autocast off."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=resolve_precision(precision, device) == "bf16")


def describe(device: torch.device, precision: str) -> dict:
    """What a run records of where it ran: the device, its name, the CPU's ISA and the precision used."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": name, "cpu_capability": cpu_capability(),
            "cpu_bf16": sorted(cpu_flags()), "precision": resolve_precision(precision, device)}


@functools.cache
def _cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform
    return platform.processor() or platform.machine()
