"""Native CPU kernels: C/C++ sources beside one builder (build.py), one Python module per weight format
with its operators' wrappers, availability checks and pure-PyTorch references."""
