"""Workloads and their measurement, shared by the load client (bench/) and the simulator
(sim/): workload files and datasets, arrival processes, per-request records and summaries,
results folders and plots. No torch."""
