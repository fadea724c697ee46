"""What every benchmark prints first: the CPU (model, cores, the flags that decide matrix speed).

CPUs differ between machines (a bf16 matrix product is several times faster than fp32 on one with
`avx512_bf16` or `amx_bf16`, and hundreds of times slower on one without), so every figure names its
CPU.
"""

from __future__ import annotations

import os
import platform

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16",
         "amx_int8", "amx_fp16")


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The flags of FLAGS this CPU has (Linux /proc/cpuinfo), in FLAGS' order."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in FLAGS if f in have]
    except OSError:
        pass
    return []


def cpu_line() -> str:
    flags = cpu_flags()
    return (f"CPU: {cpu_model()}, {os.cpu_count()} logical cores; "
            f"flags: {' '.join(flags) if flags else 'none of ' + ', '.join(FLAGS)}")


if __name__ == "__main__":
    print(cpu_line())
