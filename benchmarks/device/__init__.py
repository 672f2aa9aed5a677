"""The GPU device check (`python3 -m benchmarks.device --out DIR`): builds, checks and times stylecast's CUDA path on
a bare GPU machine with only its own python3, and its CPU dry run (`--dry-run`); see check.py and the README."""
