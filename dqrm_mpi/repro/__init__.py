"""``dqrm-repro``: the DQRM paper's Tables 1-8 and Figures 1-2 as declared runs of the CLI tools.

profiles  where and how big (data command, batch, epochs, rank counts)
specs     what: the runs, and which metric of which run fills which cell
plan      a profile + the specs -> concrete command lines (steps)
runner    runs the steps as subprocesses, skipping the finished ones
results   reads a run's files (summary.json, metrics.jsonl, export/eval JSON)
report    report.md and the CSV tables; figures: the PNGs
"""
