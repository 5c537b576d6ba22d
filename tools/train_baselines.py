"""Stage 1c: the population-level parts of Per-Pcs and PROPER, for those of the two the run's methods include.

Per-Pcs: <run>/perpcs/task_lora/, then per sharer (the stage-1 anchors) perpcs/sharers/<anchor>/ and
perpcs/gates/<anchor>.safetensors. PROPER: <run>/proper/population_lora/, then proper/group/ (the expert
mixture and its routers, trained on every target user's history items). Finished artifacts are skipped."""
from mta.run.cli import main
from mta.run.pipeline import stage1c_baselines

if __name__ == "__main__":
    main(__doc__, stage1c_baselines)
