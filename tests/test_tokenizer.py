"""DreamTokenizer: the Dream-v0 file layout (vocab.json + merges.txt) read like transformers' Qwen2 tokenizer."""

from __future__ import annotations

import pytest

from dreamlm.errors import DreamError
from dreamlm.tiny import save_tokenizer_dream_format
from dreamlm.tokenizer import DreamTokenizer

SAMPLES = [
    "Hello, world! How are you?",
    "def f(x):\n    return x * 2\n\n\n",
    "numbers 12345 and 3.14159 and  spaces   here",
    "unicode: café naïve 你好 🙂",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "fill <|mask|><|mask|> here<|endoftext|>",
    "I'll say it's what we've done",
]


def test_reads_the_dream_layout(tmp_path, tokenizer):
    save_tokenizer_dream_format(tokenizer, tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    loaded = DreamTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    assert loaded.mask_token_id == tokenizer.token_to_id("<|mask|>")
    assert loaded.eos_token_id == tokenizer.token_to_id("<|endoftext|>")


def test_matches_transformers_qwen2_tokenizer(tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    save_tokenizer_dream_format(tokenizer, tmp_path)
    ours = DreamTokenizer.from_pretrained(tmp_path)
    plain = tmp_path / "plain"  # only vocab.json + merges.txt, read by transformers' own Qwen2 class
    plain.mkdir()
    tokenizer._tok.model.save(str(plain))
    theirs = transformers.Qwen2Tokenizer.from_pretrained(str(plain))
    theirs.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|mask|>"]})
    for text in SAMPLES:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text


def test_tokenizer_json_round_trip(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    loaded = DreamTokenizer.from_pretrained(tmp_path)
    assert [loaded.encode(t) for t in SAMPLES] == [tokenizer.encode(t) for t in SAMPLES]
    assert loaded.chat_template == tokenizer.chat_template


def test_chat_template_and_specials(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.unknown_specials("a <|im_end|> b <|oops|>") == ["<|oops|>"]


def test_decode_drops_ids_past_the_vocabulary(tokenizer):
    ids = tokenizer.encode("hello")
    assert tokenizer.decode(ids + [tokenizer.vocab_size + 5, 10**6]) == "hello"


def test_bad_files_give_clear_errors(tmp_path, tokenizer):
    with pytest.raises(DreamError, match="no tokenizer"):
        DreamTokenizer.from_pretrained(tmp_path)
    save_tokenizer_dream_format(tokenizer, tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(DreamError, match="line 2 is not a 'left right' pair"):
        DreamTokenizer.from_pretrained(tmp_path)


def test_a_character_tokenizer_refuses_characters_outside_its_alphabet():
    from dreamlm.training.data import char_tokenizer

    tok = char_tokenizer("0123\n")
    assert tok.decode(tok.encode("0123<|sep|>12")) == "0123<|sep|>12"
    with pytest.raises(DreamError, match="character 'x' is not in this model's alphabet"):
        tok.encode("01x3")
