"""bf16 autocast helpers (mta.precision): the frozen weights' bf16 copies and the activations' single casts change
nothing but the copies."""
import torch
from torch import nn

from mta.models import llama
from mta.models.llama import LlamaConfig, LlamaForCausalLM
from mta.peft.lora import LoRAConfig, inject_lora, lora_layers
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


def test_activations_only_projections_read_are_cast_once_to_the_same_values(monkeypatch):
    """`gemm_input`: under autocast the norms' and attention's outputs are cast to bf16 where they are made, not by
    each projection that reads them (a LoRA's too). The logits are bit-for-bit those of casting per reader; the
    LoRA gradients differ only by the bf16 sum of the readers' input gradients; off autocast nothing changes."""
    model = tiny(tied=False)
    inject_lora(model, LoRAConfig(r=2, alpha=4.0, target_modules="all"))
    torch.manual_seed(2)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(ids)
        logits.float().square().mean().backward()
        return logits, [p.grad for p in model.parameters() if p.requires_grad]

    with torch.no_grad():
        assert llama.RMSNorm(32, 1e-5)(torch.randn(3, 32)).dtype == torch.float32  # the identity off autocast
    once, once_grads = run()
    monkeypatch.setattr(llama, "gemm_input", lambda x: x)  # every reader casts for itself
    per_reader, per_reader_grads = run()
    assert torch.equal(once, per_reader)
    for a, b in zip(once_grads, per_reader_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0.02, atol=1e-4)
