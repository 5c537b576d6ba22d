"""MTA: Merge-then-Adapt personalised LLMs (Li et al., ACL 2026), in plain PyTorch.

The folders are the layers, each importing only from those below it (pyproject.toml's import-linter
contracts): run > eval, baselines > stages > profiles, methods > training, data > peft > models > ops,
over the leaves files, seeding, log, precision and errors. `mta <command>` (mta.run.commands) runs them.
"""
