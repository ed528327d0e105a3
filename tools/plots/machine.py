"""What the benchmark JSON files record about where they were measured."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cpu_name():
    """The CPU's model name and the widest SIMD it has, from /proc/cpuinfo (Linux)."""
    name, flags = "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    return f"{name}, {simd}" if simd else name


def commit():
    """The repository's HEAD, abbreviated."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=ROOT).stdout.strip()
