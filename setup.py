from setuptools import find_packages, setup

setup(
    name="mta",
    version="0.1.0",
    description="MTA: Merge-then-Adapt personalized LLMs (Li et al., ACL 2026), in plain PyTorch",
    packages=find_packages(include=["mta", "mta.*"]),
    python_requires=">=3.10",
    install_requires=[
        # A bare `torch` can pull a multi-GB CUDA build; `make install` installs a CPU
        # wheel first on machines without a GPU (see TORCH_SPEC in the Makefile).
        "torch>=2.3",
        "tokenizers>=0.19",
        "safetensors>=0.4",
        "numpy>=1.24",
        "huggingface-hub>=0.23",
        "rouge-score>=0.1.2",
        "rank-bm25>=0.2.2",
        "sentencepiece>=0.2",
        "tqdm>=4.0",
    ],
    extras_require={
        # Test oracles: never imported by mta/, kernels/ or tools/.
        # ruff is the lint step of `make test`; its settings are in pyproject.toml.
        "test": [
            "pytest>=8", "ruff>=0.17,<0.18", "transformers>=4.45", "peft>=0.13", "scikit-learn>=1.4", "gguf>=0.10",
            "matplotlib>=3.7",
        ],
        "plot": ["matplotlib>=3.7"],
        # `--executor ray` (mta.executor): imported only when chosen.
        "ray": ["ray>=2.9"],
    },
)
