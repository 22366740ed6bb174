"""The simulated LLM backend: deterministic text, realistic timing, load reports, faults."""
