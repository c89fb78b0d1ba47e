"""The `coreinfer` command: the entry point (main.py) and the argument helpers every command shares (args.py)."""
