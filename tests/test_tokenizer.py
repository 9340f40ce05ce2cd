import os

import pytest
import torch

from data_pipelines.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, train_sentencepiece

ENGLISH = [
    "a photo of a dog on the beach",
    "a red circle at the top left",
    "two cats sleeping on a sofa",
    "a bowl of fresh fruit on a wooden table",
    "the city skyline at night",
] * 20
RUSSIAN = [
    "фотография собаки на пляже",
    "красный круг в левом верхнем углу",
    "две кошки спят на диване",
    "миска свежих фруктов на деревянном столе",
    "ночной город с высоты",
] * 20


@pytest.fixture(scope="module")
def bilingual(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "bilingual.model"
    return train_sentencepiece(ENGLISH + RUSSIAN, path, vocab_size=200, byte_fallback=False, character_coverage=1.0)


@pytest.mark.parametrize("text", [ENGLISH[0], RUSSIAN[1], "кошки спят на пляже"])
def test_round_trip(bilingual, text):
    ids = bilingual([text])
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0, 0].item() == BOS_ID
    n = int((ids[0] != PAD_ID).sum())
    assert ids[0, n - 1].item() == EOS_ID
    assert (ids[0, n:] == PAD_ID).all()
    assert bilingual.decode(ids[0]) == text


def test_truncation_keeps_eos(bilingual):
    long_text = " ".join(ENGLISH[:5] + RUSSIAN[:5])
    tok = Tokenizer(bilingual.model_proto, context_length=8)
    ids = tok([long_text, "dog"])
    assert ids.shape == (2, 8)
    assert ids[0, 0].item() == BOS_ID and ids[0, -1].item() == EOS_ID
    assert ids[0, 1:-1].tolist() == tok.encode([long_text])[0][:6]
    assert (ids[0] != PAD_ID).all()
    assert ids[1, -1].item() == PAD_ID


def test_lowercase(bilingual):
    lower = Tokenizer(bilingual.model_proto, lowercase=True)
    assert torch.equal(lower(["A Photo OF a DOG"]), bilingual(["a photo of a dog"]))
    assert torch.equal(lower(["КРАСНЫЙ Круг"]), bilingual(["красный круг"]))


def test_state_dict_round_trip(bilingual, tmp_path):
    tok = Tokenizer(bilingual.model_proto, context_length=16, lowercase=True)
    again = Tokenizer.from_state_dict(tok.state_dict())
    assert (again.context_length, again.lowercase, again.vocab_size) == (16, True, tok.vocab_size)
    tok.save(tmp_path / "t.model")
    from_file = Tokenizer.from_file(tmp_path / "t.model", context_length=16, lowercase=True)
    assert torch.equal(from_file(RUSSIAN[:3]), tok(RUSSIAN[:3]))


def test_bpe_with_byte_fallback_has_no_unknowns(tmp_path):
    tok = train_sentencepiece(ENGLISH + RUSSIAN, tmp_path / "bpe.model", vocab_size=400, model_type="bpe")
    ids = tok(["日本 🐈"])
    assert tok.sp.unk_id() not in ids[0].tolist()
    assert tok.decode(ids[0]) == "日本 🐈"


def test_model_without_special_ids_is_rejected(tmp_path):
    import sentencepiece as spm

    with open(tmp_path / "plain.model", "wb") as f:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(ENGLISH), model_writer=f, vocab_size=60, hard_vocab_limit=False, minloglevel=2
        )
    with pytest.raises(ValueError, match="no pad id"):
        Tokenizer.from_file(tmp_path / "plain.model")


def test_missing_file_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_tokenizer"):
        Tokenizer.from_file(tmp_path / "nope.model")
    (tmp_path / "notes.model").write_text("not a model")
    with pytest.raises(ValueError, match=r"tokenizer model '.*notes.model' is not a SentencePiece model \("):
        Tokenizer.from_file(tmp_path / "notes.model")


def test_failed_training_keeps_the_tokenizer_already_there(tmp_path):
    path = tmp_path / "tok.model"
    train_sentencepiece(ENGLISH, path, vocab_size=400)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="Vocabulary size is smaller than required_chars"):
        train_sentencepiece(ENGLISH + RUSSIAN, path, vocab_size=20, character_coverage=1.0)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["tok.model"]
