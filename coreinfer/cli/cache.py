"""`coreinfer cache list` and `coreinfer cache clear`: the models converted into the cache folder.

A GGUF model is converted once into fp32 safetensors (the embedded one takes ~0.5 GB) so that later
runs memory-map it; this shows where those conversions are and frees them. A cleared model is
converted again the next time it is used.
"""

import sys

from ..io.loading import cache_dir, cache_entries, remove_cache_entry


def add_parser(sub) -> None:
    p = sub.add_parser("cache", help="list or clear the models converted into the cache folder",
                       description=__doc__.splitlines()[0])
    kinds = p.add_subparsers(dest="cache_command", required=True)
    s = kinds.add_parser("list", help="each cached model with its size, and the cache folder")
    s.set_defaults(func=cmd_list)
    s = kinds.add_parser("clear", help="delete cached models; they are converted again when next used")
    s.add_argument("name", nargs="?", default=None, help="the entry to delete, as `coreinfer cache list` names it")
    s.add_argument("--all", action="store_true", help="delete every entry")
    s.set_defaults(func=cmd_clear)


def cmd_list(args) -> None:
    entries = cache_entries()
    print(f"cache folder: {cache_dir()} (set COREINFER_CACHE to move it)")
    for e in entries:
        print(f"{megabytes(e.nbytes):>10}  {e.name}")
    print(f"{megabytes(sum(e.nbytes for e in entries)):>10}  total, {len(entries)} entries"
          + ("; `coreinfer cache clear NAME` or `--all` frees them" if entries else ""))


def cmd_clear(args) -> None:
    if (args.name is None) == (not args.all):
        raise ValueError("cache clear takes one NAME (see `coreinfer cache list`) or --all")
    entries = cache_entries()
    if args.name is not None:
        entries = [e for e in entries if e.name == args.name]
        if not entries:
            raise ValueError(f"no cache entry named {args.name!r} in {cache_dir()} (see `coreinfer cache list`)")
    for e in entries:
        remove_cache_entry(e)
        print(f"removed {e.name} ({megabytes(e.nbytes)})", file=sys.stderr)
    if not entries:
        print(f"the cache {cache_dir()} holds nothing to clear", file=sys.stderr)


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
