import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory):
    """(lamp_dir, llm_dir, bert_dir) of tiny self-made inputs, shared by the pipeline tests."""
    from tests.fixtures import make_bert, make_lamp, make_llm

    root = tmp_path_factory.mktemp("tiny")
    return make_lamp(root / "lamp"), make_llm(root / "llm"), make_bert(root / "bert")
