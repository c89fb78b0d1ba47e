"""`coreinfer bench`: its flags. The benchmark itself (bench/run.py) imports the engine, and with it
torch, only when it runs, so `coreinfer bench --help` and flag errors do not wait for them."""


def cmd_bench(args) -> None:
    from .run import cmd_bench as run

    run(args)


def add_parser(sub) -> None:
    from ..cli.args import add_core_args, add_runtime_args

    p = sub.add_parser("bench", help="decode speed side by side: transformers, coreinfer dense/core, llama.cpp")
    add_runtime_args(p)
    add_core_args(p, grid=True)
    # --weights may list formats here ("dense,int8" builds one model each); dense by default, the baseline that
    # generate's default, timed in its own row, is compared with
    p.set_defaults(beta="0.5,0.7", weights="dense")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up round")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when it is installed")
    p.add_argument("--no-default", action="store_true",
                   help="skip the row of generate's default as it runs (it loads one more copy of the model)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=cmd_bench)

