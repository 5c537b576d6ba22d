"""bf16 autocast helpers (mta.precision): the frozen weights' bf16 copies change nothing but the copies."""
import torch
from torch import nn

from mta.llama import LlamaConfig, LlamaForCausalLM
from mta.precision import bf16_weights


def tiny(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def test_bf16_weights_give_autocasts_outputs_bit_for_bit_and_put_the_weights_back():
    model = tiny()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    before = {n: p for n, p in model.named_parameters()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(ids)
        with bf16_weights(model):
            assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
            assert model.lm_head.weight.dtype == torch.bfloat16
            assert model.model.embed_tokens.weight.dtype == torch.float32  # not a linear: looked up, not cast
            got = model(ids)
    assert torch.equal(got, want)
    assert {n: p for n, p in model.named_parameters()} == before  # the same Parameter objects
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_bf16_weights_leave_trainable_weights_and_are_a_no_op_when_off():
    model = tiny(tied=False)
    trainable = model.model.layers[1].self_attn.q_proj
    trainable.weight.requires_grad_(True)
    with bf16_weights(model):
        assert trainable.weight.dtype == torch.float32 and isinstance(trainable.weight, nn.Parameter)
        assert model.model.layers[1].self_attn.k_proj.weight.dtype == torch.bfloat16
    with bf16_weights(model, enabled=False):
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_weights_are_put_back_after_an_error():
    model = tiny()
    w = model.model.layers[0].self_attn.o_proj.weight
    try:
        with bf16_weights(model):
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert model.model.layers[0].self_attn.o_proj.weight is w
