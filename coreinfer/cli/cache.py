"""`coreinfer cache list` and `coreinfer cache clear`: what coreinfer wrote into its cache folder.

A GGUF model is converted once into fp32 safetensors (the embedded one takes ~0.5 GB) so that later
runs memory-map it; compiled decode steps (torch inductor's caches, with its precompiled headers) and
the native kernels built from coreinfer's C++ sources live there too. This shows where they are and
frees them; whatever is cleared is converted, compiled or built again the next time it is needed.
"""

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .args import count

# cache subfolders of build products, by name: what each holds
BUILT = {"inductor": "compiled decode steps and precompiled headers (torch inductor)",
         "native": "native kernels built from coreinfer's C/C++ sources"}


@dataclass
class Built:
    path: Path
    nbytes: int

    @property
    def name(self) -> str:
        return self.path.name


def built_folders() -> list[Built]:
    """The build-product folders that exist in the cache, with their sizes."""
    from ..io.loading import cache_dir

    folders = [cache_dir() / name for name in BUILT]
    return [Built(f, folder_bytes(f)) for f in folders if f.is_dir()]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def add_parser(sub) -> None:
    p = sub.add_parser("cache", help="list or clear the cache folder: converted models, compiled steps, native kernels",
                       description=__doc__.splitlines()[0])
    kinds = p.add_subparsers(dest="cache_command", required=True)
    s = kinds.add_parser("list", help="each cached model and build folder with its size, and the cache folder")
    s.set_defaults(func=cmd_list)
    s = kinds.add_parser("clear", help="delete cache entries; they are converted or built again when next used")
    s.add_argument("name", nargs="?", default=None, help="the entry to delete, as `coreinfer cache list` names it")
    s.add_argument("--all", action="store_true", help="delete every entry")
    s.set_defaults(func=cmd_clear)


def cmd_list(args) -> None:
    from ..io.loading import cache_dir, cache_entries

    entries, built = cache_entries(), built_folders()
    print(f"cache folder: {cache_dir()} (set COREINFER_CACHE to move it)")
    for e in entries:
        print(f"{megabytes(e.nbytes):>10}  {e.name}")
    for b in built:
        print(f"{megabytes(b.nbytes):>10}  {b.name}/  {BUILT[b.name]}")
    n = len(entries) + len(built)
    print(f"{megabytes(sum(e.nbytes for e in [*entries, *built])):>10}  total, {count(n, 'entry', 'entries')}"
          + ("; `coreinfer cache clear NAME` or `--all` frees them" if n else ""))


def cmd_clear(args) -> None:
    from ..io.loading import cache_dir, cache_entries, remove_cache_entry

    if (args.name is None) == (not args.all):
        raise ValueError("cache clear takes one NAME (see `coreinfer cache list`) or --all")
    entries, built = cache_entries(), built_folders()
    if args.name is not None:
        entries = [e for e in entries if e.name == args.name]
        built = [b for b in built if b.name == args.name.rstrip("/")]
        if not entries and not built:
            raise ValueError(f"no cache entry named {args.name!r} in {cache_dir()} (see `coreinfer cache list`)")
    for e in entries:
        remove_cache_entry(e)
        print(f"removed {e.name} ({megabytes(e.nbytes)})", file=sys.stderr)
    for b in built:
        shutil.rmtree(b.path)
        print(f"removed {b.name}/ ({megabytes(b.nbytes)})", file=sys.stderr)
    if not entries and not built:
        print(f"the cache {cache_dir()} holds nothing to clear", file=sys.stderr)


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
