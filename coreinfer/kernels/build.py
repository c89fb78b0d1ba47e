"""The one builder of coreinfer's native code: a source file of this package compiled into the cache folder.

Each `.cpp` file is a set of torch operators (`torch.ops.coreinfer.*`, C++ against torch's headers, so
inductor's C++ wrapper calls them without Python) and each `.c` file a plain library for ctypes. A build
happens once: the file name keys the source, the package's headers, the CPU (the code is -march=native
and must not reach another CPU through a shared cache folder) and, for torch operators, torch's version
and C++ ABI. No compiler, or a failed build: None, with one line on stderr naming what runs instead.
"""

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCES = Path(__file__).parent


def cpu_model() -> str:
    """This CPU's model name and feature flags (Linux), else the platform's processor string."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))


def torch_abi() -> str:
    return f"{torch.__version__} abi{int(torch._C._GLIBCXX_USE_CXX11_ABI)}"


def source_key(name: str) -> str:
    """The hash that names `name`'s build: its text, every header here, the CPU, torch for operators."""
    parts = [(SOURCES / name).read_text()] + [h.read_text() for h in sorted(SOURCES.glob("*.h"))]
    parts += [cpu_model()] + ([torch_abi()] if name.endswith(".cpp") else [])
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def command(src: Path, out: Path) -> list[str]:
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", f"-I{SOURCES}"]
    if src.suffix == ".c":
        return [os.environ.get("CC", "cc"), *flags, str(src), "-o", str(out)]
    torch_dir = Path(torch.__file__).parent
    return [os.environ.get("CXX", "c++"), *flags, "-std=c++17", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-I{torch_dir / 'include'}", f"-I{torch_dir / 'include/torch/csrc/api/include'}", str(src),
            "-o", str(out), f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10"]


def build(name: str, folder: Path, fallback: str) -> Path | None:
    """The shared library of source file `name` (e.g. "q4_gemv.cpp") in `folder`, compiled there first if
    it is not; None, with "coreinfer: no native <stem> (<the compiler's last line>); <fallback>" on stderr."""
    path = folder / f"{Path(name).stem}-{source_key(name)}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / path.name
        try:
            subprocess.run(command(SOURCES / name, out), check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = (getattr(e, "stderr", "") or str(e)).strip()
            last = detail.splitlines()[-1] if detail else str(e)
            print(f"coreinfer: no native {Path(name).stem.replace('_', ' ')} ({last}); {fallback}", file=sys.stderr)
            return None
        os.replace(out, path)  # atomic: another process may be building the same file
    return path


def build_all(names: tuple[str, ...], fallback: str) -> None:
    """Compile those of `names` not yet in the cache folder at once, one compiler each: a first start
    waited for three serial builds of ~10 s (each mostly parsing torch's headers, one core each), and the
    machine has more than one core. The later `load_operators` calls then find the libraries built."""
    from ..io.loading import cache_dir

    if platform.machine() not in ("x86_64", "AMD64"):
        return
    folder = cache_dir() / "native"
    with ThreadPoolExecutor(len(names)) as pool:  # threads wait on compiler processes, outside the GIL
        list(pool.map(lambda name: build(name, folder, fallback), names))


def load_operators(name: str, fallback: str) -> bool:
    """Build `name` (a .cpp of torch operators) into the cache folder and load it into torch.ops; False
    where it cannot be built or this is not an x86-64 CPU (the kernels are AVX-512)."""
    from ..io.loading import cache_dir

    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    path = build(name, cache_dir() / "native", fallback)
    if path is None:
        return False
    torch.ops.load_library(str(path))
    return True
