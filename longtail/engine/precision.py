"""Which precision and memory format a run uses: ``train.amp`` and ``train.channels_last``, with
``auto`` resolved from what the hardware runs fast.

On CUDA ``auto`` is bfloat16 autocast and channels_last, as before. On a CPU ``auto`` reads the
CPU's instruction set: bfloat16 autocast where it has native bfloat16 arithmetic (AVX-512 BF16 or
AMX: Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later), channels_last where oneDNN
has its AVX-512 kernels. Measured on a 2-core Xeon with AMX (``benchmarks/plain_step.py``, a plain
ResNet-32 step, batch 128, 2026-12-06): float32 NCHW 193 img/s, float32 channels_last 260,
bfloat16 NCHW 341, bfloat16 channels_last 397; on an AMD EPYC Zen 4 (issue 21): 253-297, 347-370,
500-509, 543-650. A CPU without these instructions keeps float32 NCHW, where bfloat16 is emulated
and slower. Losses, metrics, calibrators and stored statistics stay float32 whatever is chosen: the
trainer casts model outputs to float32 before the loss, and ``predict`` returns float32 logits.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Precision", "resolve_precision", "cpu_features"]


@dataclass(frozen=True)
class Precision:
    """The resolved choice: autocast dtype (None: float32), channels_last, and why."""

    amp_dtype: torch.dtype | None
    channels_last: bool
    reason: str

    @property
    def label(self) -> str:
        precision = {None: "float32", torch.bfloat16: "bfloat16 autocast", torch.float16: "float16 autocast"}
        return f"{precision[self.amp_dtype]}, {'channels_last' if self.channels_last else 'NCHW'} ({self.reason})"


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """The CPU flags that decide the CPU defaults: ``avx512``, ``avx512_bf16``, ``amx_bf16``.

    torch's own checks first (they ask CPUID, so they hold in containers too); /proc/cpuinfo where a
    torch build lacks them."""
    found: set[str] = set()
    checks = {"avx512": "_is_avx512_supported", "avx512_bf16": "_is_avx512_bf16_supported",
              "amx_bf16": "_is_amx_tile_supported"}
    for flag, name in checks.items():
        check = getattr(torch.cpu, name, None)
        if check is not None and check():
            found.add(flag)
    if not found and Path("/proc/cpuinfo").is_file():
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
        found.update(flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags)
        if "avx512f" in flags:
            found.add("avx512")
    return frozenset(found)


def resolve_precision(amp: str, channels_last: str, device: torch.device) -> Precision:
    """``amp`` in auto/none/bf16/fp16 and ``channels_last`` in auto/yes/no (the config's values) for ``device``."""
    reasons = []
    if amp == "auto":
        if device.type == "cuda":
            dtype, why = torch.bfloat16, "CUDA"
        else:
            native = cpu_features() & {"avx512_bf16", "amx_bf16"}
            dtype = torch.bfloat16 if native else None
            why = f"CPU with {'/'.join(sorted(native))}" if native else "CPU without native bfloat16"
        reasons.append(f"train.amp=auto: {why}")
    else:
        dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if channels_last == "auto":
        if device.type == "cuda":
            use, why = True, "CUDA"
        else:
            use = "avx512" in cpu_features()
            why = "CPU with AVX-512" if use else "CPU without AVX-512"
        reasons.append(f"train.channels_last=auto: {why}")
    else:
        use = channels_last == "yes"
    return Precision(dtype, use, "; ".join(reasons) or "set in the config")
