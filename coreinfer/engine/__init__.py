"""The engine: selection math, selection policies, prefill observation, compaction, the session and
the decode loop, and the quantized kernels. Reads top-down: selection -> observe -> policy -> clusters
-> compact -> session -> generate."""
