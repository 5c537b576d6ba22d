"""MTA: Merge-then-Adapt personalised LLMs (Li et al., ACL 2026), in plain PyTorch.

The folders are the layers, each importing only from those below it (pyproject.toml's import-linter
contracts): run > eval, baselines > stages > profiles, methods > training, data > peft > models > ops,
over stamps and the leaves files, seeding, log, precision and errors. `mta <command>` (mta.run.commands) runs them.
"""


def __getattr__(name: str):
    """`mta.Personalizer` (mta.run.personalizer), imported on first use so that `import mta` stays light."""
    if name == "Personalizer":
        from mta.run.personalizer import Personalizer

        return Personalizer
    raise AttributeError(f"module 'mta' has no attribute {name!r}")
