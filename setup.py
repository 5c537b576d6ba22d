from setuptools import find_packages, setup

setup(
    name="mta",
    version="0.1.0",
    description="MTA: Merge-then-Adapt personalized LLMs (Li et al., ACL 2026), in plain PyTorch",
    packages=find_packages(include=["mta", "mta.*"]),
    package_data={"mta.eval": ["paper_results.json"]},
    entry_points={"console_scripts": ["mta = mta.run.commands:entry"]},
    python_requires=">=3.10",
    install_requires=[
        # F.rms_norm and scaled_dot_product_attention(enable_gqa=...) need 2.5. `make install` installs the
        # version constraints.txt locks first, from TORCH_INDEX when given (see the Makefile).
        "torch>=2.5",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "numpy>=1.24",
        "huggingface-hub>=0.34",  # the `hf` command our messages name
        "rouge-score>=0.1.2",
        "rank-bm25>=0.2.2",
        "sentencepiece>=0.2",
        "tqdm>=4.0",
    ],
    extras_require={
        # Test oracles: never imported by mta/ or tools/ (benchmarks excepted).
        # ruff and import-linter are the lint steps of `make test`; their settings are in pyproject.toml.
        "test": [
            "pytest>=8", "ruff>=0.17,<0.18", "import-linter>=2.1", "transformers>=4.45", "peft>=0.13",
            "scikit-learn>=1.4", "gguf>=0.10", "matplotlib>=3.7",
        ],
        "plot": ["matplotlib>=3.7"],
        # `--executor ray` (mta.run.executor): imported only when chosen.
        "ray": ["ray>=2.9"],
        # `mta serve` (mta.run.serve): imported only by that command and its tests.
        "serve": ["fastapi>=0.110", "uvicorn>=0.29"],
        # `--report-to tensorboard` (mta.run.tensorboard): imported only when chosen.
        "tensorboard": ["tensorboard>=2.14"],
    },
)
