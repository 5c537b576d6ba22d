"""Stage 1b: train one meta-LoRA per anchor on the anchor's own history (the Meta-LoRA Bank).

Writes <run>/bank/<anchor>/ in PEFT's format, one adapter at a time; finished adapters are skipped."""
from mta.run.cli import main
from mta.run.pipeline import stage1_bank

if __name__ == "__main__":
    main(__doc__, stage1_bank)
