"""aimesh benchmarks: `make bench` (python -m bench) runs them and updates docs/benchmarks.md."""
