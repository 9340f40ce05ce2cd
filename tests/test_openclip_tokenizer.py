"""OpenAI/OpenCLIP's BPE as a clip_pl tokenizer: the ids open_clip gives, in checkpoints and exports."""

import gzip
import pickle

import open_clip
import pytest
import torch
from tiny_clip import CONTEXT_LENGTH, make_tokenizer, random_image, write_checkpoint

import clip_pl
from clip_pl import export
from clip_pl.model import create_model
from data_pipelines.openclip_tokenizer import OpenCLIPTokenizer
from data_pipelines.tokenizer import tokenizer_from_state_dict

CAPTIONS = [
    "A red  handwritten SEVEN!",
    "café &amp; naïve résumé",  # ftfy and HTML unescaping
    "a photo of a " + "very " * 40 + "long caption",  # cut, with the end token kept
    "",
    "Москва 2026 🙂",
]


@pytest.fixture(scope="module")
def bpe():
    return OpenCLIPTokenizer.from_file(context_length=CONTEXT_LENGTH)


def test_ids_equal_open_clips_own(bpe):
    reference = open_clip.get_tokenizer("ViT-B-32", context_length=CONTEXT_LENGTH)
    ids = bpe(CAPTIONS)
    assert ids.shape == (len(CAPTIONS), CONTEXT_LENGTH) and torch.equal(ids, reference(CAPTIONS))
    assert (bpe.vocab_size, bpe.bos_id, bpe.eos_id, bpe.pad_id) == (49408, 49406, 49407, 0)
    assert ids[2, -1] == bpe.eos_id  # a cut caption still ends with the token the text tower pools at
    assert bpe.decode(ids[0]) == "a red handwritten seven !"
    assert bpe.encode(["A Cat"]) == [bpe(["a cat"])[0, 1:3].tolist()]  # the ids between start and end


def test_state_round_trip_and_worker_pickling(bpe):
    state = bpe.state_dict()
    assert state["kind"] == "openclip_bpe" and gzip.decompress(state["merges"]).startswith(b"\"bpe_simple_vocab")
    for rebuilt in (tokenizer_from_state_dict(state), pickle.loads(pickle.dumps(bpe))):
        assert torch.equal(rebuilt(CAPTIONS), bpe(CAPTIONS)) and rebuilt.vocabulary() == bpe.vocabulary()


def test_sentencepiece_states_without_a_kind_still_load(tmp_path):
    sentencepiece = make_tokenizer(tmp_path)
    state = {k: v for k, v in sentencepiece.state_dict().items() if k != "kind"}  # as older checkpoints hold it
    assert torch.equal(tokenizer_from_state_dict(state)(["a red apple"]), sentencepiece(["a red apple"]))
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'"):
        tokenizer_from_state_dict({**state, "kind": "wordpiece"})


def test_bad_merges_file_is_one_clear_error(tmp_path):
    (tmp_path / "tok.model").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="not a gzipped OpenCLIP BPE merges file.*tokenizer.path=null"):
        OpenCLIPTokenizer.from_file(tmp_path / "tok.model")
    with pytest.raises(FileNotFoundError, match="missing.gz"):
        OpenCLIPTokenizer.from_file(tmp_path / "missing.gz")


def test_checkpoint_and_export_keep_the_bpe(bpe, tmp_path):
    torch.manual_seed(0)
    text = {"vocab_size": bpe.vocab_size, "eos_id": bpe.eos_id, "pad_id": bpe.pad_id, "context_length": CONTEXT_LENGTH}
    model = create_model("tiny", text={**text, "width": 32, "heads": 2, "layers": 1}).eval()
    checkpoint = write_checkpoint(model, bpe, tmp_path / "last.ckpt")
    assert export.main([str(checkpoint), str(tmp_path / "model.safetensors")]) == 0
    with torch.no_grad():
        expected = model.encode_text(bpe(CAPTIONS))
    for path in (checkpoint, tmp_path / "model.safetensors"):
        loaded, preprocess, tokenizer = clip_pl.load(path)
        assert tokenizer.kind == "openclip_bpe" and torch.equal(tokenizer(CAPTIONS), bpe(CAPTIONS))
        with torch.no_grad():
            assert torch.equal(loaded.encode_text(tokenizer(CAPTIONS)), expected)
            assert loaded.encode_image(preprocess(random_image(0))[None]).shape == (1, model.config.embed_dim)
