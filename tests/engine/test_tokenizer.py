"""Tokenizer parity with transformers' PreTrainedTokenizerFast on the same folders, EOS ids, errors,
and the streaming decoder."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dymoe.engine.tokenizer import StreamDecoder, Tokenizer
from dymoe.errors import CheckpointError

STRINGS = [
    "Mixture-of-Experts models route tokens to experts.",
    "héllo wörld, naïve façade, Größe",
    "日本語のテキスト and 中文",
    "🤖🚀 emoji 👩‍👩‍👧‍👦 family 🇫🇷 flag ✨",
    "  leading spaces\n\nnew lines\tand tabs  ",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<s>[INST] special tokens in text </s>",
    "",
    "a" * 40,
]

EMOJI_TEXT = "🤖 robots 🚀🚀 rockets 👩‍👩‍👧‍👦 fam 🇫🇷🇯🇵 flags 🧪✨ 日本語 café 🙂" * 3

FOLDERS = ["qwen_dir", "mixtral_dir", "sentencepiece_dir"]


@pytest.fixture(params=FOLDERS)
def folder(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("text", STRINGS)
def test_encode_decode_match_transformers(folder, hf_tokenizer, text):
    ours, theirs = Tokenizer.from_dir(folder), hf_tokenizer(folder)
    for special in (True, False):
        ids = ours.encode(text, add_special_tokens=special)
        assert ids == theirs.encode(text, add_special_tokens=special)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def test_round_trip_keeps_unicode(qwen_dir):
    tokenizer = Tokenizer.from_dir(qwen_dir)
    for text in [EMOJI_TEXT, *STRINGS[:5]]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode("<|im_start|>x<|im_end|>")) == "x"


def test_bos_from_post_processor(mixtral_dir, sentencepiece_dir, qwen_dir):
    for path in (mixtral_dir, sentencepiece_dir):
        tokenizer = Tokenizer.from_dir(path)
        assert tokenizer.bos_token_id is not None
        assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id
        assert tokenizer.encode("hi", add_special_tokens=False)[0] != tokenizer.bos_token_id
    qwen = Tokenizer.from_dir(qwen_dir)
    assert qwen.bos_token_id is None
    assert qwen.encode("hi") == qwen.encode("hi", add_special_tokens=False)


def test_add_bos_token_applies_without_post_processor(bare_bos_dir):
    tokenizer = Tokenizer.from_dir(bare_bos_dir)
    bos = tokenizer.token_id("<s>")
    assert bos is not None
    plain = tokenizer.encode("hello world", add_special_tokens=False)
    assert tokenizer.encode("hello world") == [bos, *plain]


def test_special_token_dicts_are_read(mixtral_dir):
    tokenizer = Tokenizer.from_dir(mixtral_dir)
    assert tokenizer.special_tokens["bos_token"] == "<s>"
    assert tokenizer.special_tokens["eos_token"] == "</s>"
    assert tokenizer.special_tokens["unk_token"] is None


def test_eos_ids_from_generation_config_list(qwen_dir, backend_tokenizer):
    tokenizer = Tokenizer.from_dir(qwen_dir)
    expected = (backend_tokenizer.token_to_id("<|im_end|>"), backend_tokenizer.token_to_id("<|endoftext|>"))
    assert tokenizer.eos_token_ids == expected
    assert len(set(expected)) == 2


def test_eos_ids_fall_back_to_config_then_tokenizer(mixtral_dir, bare_bos_dir, backend_tokenizer):
    assert Tokenizer.from_dir(mixtral_dir).eos_token_ids == (backend_tokenizer.token_to_id("</s>"),)
    assert Tokenizer.from_dir(bare_bos_dir).eos_token_ids == (backend_tokenizer.token_to_id("</s>"),)


def test_eos_id_as_int_in_generation_config(tmp_path, qwen_dir):
    shutil.copytree(qwen_dir, tmp_path / "m")
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert Tokenizer.from_dir(tmp_path / "m").eos_token_ids == (7,)


# ---- streaming ------------------------------------------------------------------------------


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    decoder = StreamDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces = [decoder.push(i) for i in ids]
    return pieces + [decoder.flush()]


@pytest.mark.parametrize("text", [EMOJI_TEXT, *STRINGS])
def test_stream_decoder_equals_decode(folder, text):
    tokenizer = Tokenizer.from_dir(folder)
    ids = tokenizer.encode(text)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[-1] == ""  # nothing left over: every character was complete


def test_stream_decoder_holds_back_split_characters(qwen_dir):
    tokenizer = Tokenizer.from_dir(qwen_dir)
    ids = tokenizer.encode("🤖")
    assert len(ids) > 1  # the emoji is split over byte-level pieces
    pieces = stream(tokenizer, ids)
    assert pieces[:-2] == [""] * (len(ids) - 1) and pieces[-2] == "🤖"


def test_stream_decoder_keeps_spaces_between_sentencepiece_tokens(sentencepiece_dir):
    tokenizer = Tokenizer.from_dir(sentencepiece_dir)
    ids = tokenizer.encode("the expert runs the token", add_special_tokens=False)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == "the expert runs the token"
    assert any(p.startswith(" ") for p in pieces)


def test_stream_decoder_flushes_an_unfinished_character(qwen_dir):
    tokenizer = Tokenizer.from_dir(qwen_dir)
    ids = tokenizer.encode("ok") + tokenizer.encode("🤖")
    pieces = stream(tokenizer, ids[:-1])
    assert "".join(pieces) == tokenizer.decode(ids[:-1])
    assert pieces[-1].endswith("\ufffd")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(list("ab é日🤖🚀✨\n") + ["👩‍👧", "ok ", "<|im_end|>"]), max_size=30))
def test_stream_decoder_property(qwen_dir_for_hypothesis, parts):
    tokenizer = qwen_dir_for_hypothesis
    ids = tokenizer.encode("".join(parts))
    for skip in (True, False):
        assert "".join(stream(tokenizer, ids, skip)) == tokenizer.decode(ids, skip_special_tokens=skip)


@pytest.fixture(scope="module")
def qwen_dir_for_hypothesis(qwen_dir):
    return Tokenizer.from_dir(qwen_dir)


# ---- errors ---------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="is not a folder"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(CheckpointError, match=r"tokenizer\.json not found.*download"):
        Tokenizer.from_dir(tmp_path)


def test_unparsable_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: cannot parse"):
        Tokenizer.from_dir(tmp_path)


def test_unreadable_tokenizer_config(tmp_path, qwen_dir):
    shutil.copy(qwen_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: cannot read it as JSON"):
        Tokenizer.from_dir(tmp_path)


def test_chat_without_template(bare_bos_dir):
    tokenizer = Tokenizer.from_dir(bare_bos_dir)
    assert not tokenizer.has_chat_template
    with pytest.raises(CheckpointError, match="no chat template") as info:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert str(bare_bos_dir) in str(info.value)


def test_decode_accepts_a_tensor(qwen_dir):
    import torch

    tokenizer = Tokenizer.from_dir(qwen_dir)
    ids = tokenizer.encode(EMOJI_TEXT)
    assert tokenizer.decode(torch.tensor(ids)) == tokenizer.decode(ids) == EMOJI_TEXT


def test_space_clean_up_only_for_non_bpe(tmp_path, hf_tokenizer, qwen_dir):
    """WordPiece checkpoints ask for transformers' space clean-up; BPE ones never get it."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from tests.engine.conftest import TEXT, write_json

    backend = Backend(models.WordPiece(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    backend.train_from_iterator([TEXT], trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                                  show_progress=False))
    backend.save(str(tmp_path / "tokenizer.json"))
    write_json(tmp_path / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                                    "unk_token": "[UNK]", "clean_up_tokenization_spaces": True})
    text = "Numbers, punctuation (brackets) and dashes. Is it? Yes!"
    ours, theirs = Tokenizer.from_dir(tmp_path), hf_tokenizer(tmp_path)
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert " ," not in ours.decode(ids) and " ." not in ours.decode(ids)

    shutil.copytree(qwen_dir, tmp_path / "bpe")
    config = json.loads((tmp_path / "bpe" / "tokenizer_config.json").read_text())
    write_json(tmp_path / "bpe" / "tokenizer_config.json", {**config, "clean_up_tokenization_spaces": True})
    bpe = Tokenizer.from_dir(tmp_path / "bpe")
    assert bpe.decode(bpe.encode("a , b .")) == "a , b ."
