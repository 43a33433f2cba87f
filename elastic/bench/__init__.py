"""Benchmarks and link emulation, beside the trainer and never on its path: nothing in elastic's training
modules imports from here.

- `runs`: `bench-converge` and `bench-recovery` (whole runs on a Ray cluster), and the BENCHMARKS.md rows.
- `gpu`: `bench-gpu`, the stack against DDP and a compiled single-process loop on GPUs.
- `converge_gpu`: `bench-converge-gpu`, dense vs demo at GPT-2 scale with ranks simulated in one process.
- `checkpoint`: `python -m elastic.bench.checkpoint`, what a checkpoint costs the step it is taken in.
- `slowlink`, `netwire`, `netns`: Ray nodes behind shaped links (bandwidth, latency), and the wire's bytes.
"""
