"""`coreinfer bench`: the contenders (contenders.py) and the side-by-side run, table and command (run.py)."""
