"""DreamTokenizer: a thin layer over a `tokenizers.Tokenizer`, loaded offline from a checkpoint directory.

Real Dream checkpoints ship Qwen2's byte-level BPE as `vocab.json` + `merges.txt` (+ `tokenizer_config.json` with
the added special tokens and the chat template); others ship `tokenizer.json`. Both are read here; the BPE itself
is the `tokenizers` library's.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from dreamlm.errors import DreamError
from dreamlm.files import read_text, text_file

# Qwen2's pre-tokenization split (a fact of the format, the same regex every Qwen2 tokenizer uses).
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIAL_PATTERN = re.compile(r"<\|[^<>|\s]*\|>")
SURROGATE = re.compile("[\ud800-\udfff]")  # a str may hold one (JSON "\ud800", undecodable argv); UTF-8 cannot
MASK = "<|mask|>"
EXPAND = "<|expand|>"  # DreamOn's length states: a slot that stands for two or more tokens ...
DELETE = "<|delete|>"  # ... or for none
ENDOFTEXT = "<|endoftext|>"


def has_tokenizer_files(path: str | Path) -> bool:
    """True if the directory holds tokenizer.json or vocab.json + merges.txt."""
    path = Path(path)
    return (path / "tokenizer.json").is_file() or ((path / "vocab.json").is_file() and (path / "merges.txt").is_file())


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def qwen2_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A Qwen2-style byte-level BPE `tokenizers.Tokenizer` over the given vocab and merges."""
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


class DreamTokenizer:
    """Encode/decode text, find special ids, render the chat template."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any] | None = None,
                 source: Path | None = None) -> None:
        self._tok = tokenizer
        self.config = dict(config or {})
        self.source = source
        self.chat_template: str | None = self.config.get("chat_template")

    # ---- loading / saving ----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> "DreamTokenizer":
        """Load from a directory (tokenizer.json, or vocab.json + merges.txt, plus tokenizer_config.json)."""
        path = Path(path)
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            config = cls._read_json(path / "tokenizer_config.json")
        if (path / "tokenizer.json").is_file():
            text_file(path / "tokenizer.json", "tokenizer file")
            try:
                tok = Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as exc:  # tokenizers raises a bare Exception on malformed files
                raise DreamError(f"{path / 'tokenizer.json'} is not a valid tokenizer file: {exc}") from None
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            vocab = cls._read_json(path / "vocab.json")
            lines = read_text(path / "merges.txt", "tokenizer file").splitlines()
            merges = []
            for n, line in enumerate(lines, start=1):
                if not line or line.startswith("#version"):
                    continue
                parts = line.split(" ")
                if len(parts) != 2:
                    raise DreamError(f"{path / 'merges.txt'} line {n} is not a 'left right' pair: {line!r}")
                merges.append((parts[0], parts[1]))
            if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()):
                raise DreamError(f"{path / 'vocab.json'} must map token strings to integer ids")
            try:
                tok = qwen2_bpe(vocab, merges)
            except Exception as exc:  # tokenizers raises a bare Exception (e.g. a merge of unknown tokens)
                raise DreamError(f"{path} holds a broken BPE vocabulary or merges: {exc}") from None
        else:
            raise DreamError(f"no tokenizer in {path} (expected tokenizer.json or vocab.json + merges.txt)")
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict) or not all(
                isinstance(k, str) and k.isdigit() and isinstance(v, dict) and isinstance(v.get("content"), str)
                for k, v in decoder.items()):
            raise DreamError(f"{path / 'tokenizer_config.json'}: added_tokens_decoder must map ids to "
                             "{\"content\": ...} objects")
        for token_id, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            content = spec["content"]
            if tok.token_to_id(content) is None:
                tok.add_special_tokens([AddedToken(content, special=spec.get("special", True), normalized=False,
                                                   lstrip=spec.get("lstrip", False), rstrip=spec.get("rstrip", False),
                                                   single_word=spec.get("single_word", False))])
            if tok.token_to_id(content) != int(token_id):
                raise DreamError(
                    f"tokenizer_config.json puts {content!r} at id {token_id}, but the vocabulary gives "
                    f"{tok.token_to_id(content)}"
                )
        return cls(tok, config, source=path)

    @staticmethod
    def _read_json(file: Path) -> dict[str, Any]:
        try:
            data = json.loads(read_text(file, "tokenizer file"))
        except json.JSONDecodeError as exc:
            raise DreamError(f"{file} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise DreamError(f"{file} must hold a JSON object")
        return data

    def save_pretrained(self, path: str | Path) -> None:
        """Write the tokenizer in the layout it came in: vocab.json + merges.txt stay as they were (Dream-v0),
        anything else as tokenizer.json; tokenizer_config.json always carries the current specials."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        src = self.source
        bpe_files = src is not None and not (src / "tokenizer.json").is_file() and has_tokenizer_files(src)
        if bpe_files and src.resolve() != path.resolve():
            for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
                if (src / name).is_file():
                    shutil.copyfile(src / name, path / name)
        elif not bpe_files:
            self._tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")

    def add_special_token(self, content: str) -> int:
        """Add a special token as the next id (recorded in tokenizer_config.json); returns its id."""
        self._tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        token_id = self._tok.token_to_id(content)
        decoder = self.config.setdefault("added_tokens_decoder", {})
        decoder[str(token_id)] = {"content": content, "special": True, "normalized": False, "lstrip": False,
                                  "rstrip": False, "single_word": False}
        if content == MASK:
            self.config["mask_token"] = content
        return token_id

    # ---- ids -----------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer defines (added tokens included); ids at or past it are never decoded."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None."""
        return self._tok.token_to_id(token)

    def _special_id(self, key: str, fallback: str | None) -> int | None:
        content = _token_content(self.config.get(key)) or fallback
        return None if content is None else self._tok.token_to_id(content)

    @property
    def mask_token_id(self) -> int | None:
        """Id of `<|mask|>` (or the configured mask token)."""
        return self._special_id("mask_token", MASK)

    @property
    def eos_token_id(self) -> int | None:
        """Id of the end-of-text token."""
        return self._special_id("eos_token", ENDOFTEXT)

    @property
    def pad_token_id(self) -> int | None:
        """Id of the padding token (Dream: same as EOS)."""
        return self._special_id("pad_token", ENDOFTEXT)

    @property
    def bos_token_id(self) -> int | None:
        """Id of the beginning-of-text token, if the tokenizer names one."""
        return self._special_id("bos_token", None)

    def special_tokens(self) -> set[str]:
        """All added special token strings."""
        return {t.content for t in self._tok.get_added_tokens_decoder().values()}

    def unknown_specials(self, text: str) -> list[str]:
        """`<|...|>` markers in text that are not tokens of this tokenizer (likely typos)."""
        known = self.special_tokens()
        return [m for m in SPECIAL_PATTERN.findall(text) if m not in known]

    # ---- text ----------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of text; special token strings in it become their ids; no BOS/EOS added. A character tokenizer
        refuses characters outside its alphabet (they would silently become <|pad|>)."""
        if not isinstance(text, str):
            raise DreamError(f"the text to encode must be a string, got {type(text).__name__}")
        lone = SURROGATE.search(text)
        if lone:
            raise DreamError(f"the text holds a lone UTF-16 surrogate ({lone.group(0)!r} at character "
                             f"{lone.start()}), which is not Unicode text")
        alphabet = self.config.get("alphabet")
        if alphabet is not None:
            plain = text
            for special in self.special_tokens():
                plain = plain.replace(special, "")
            unknown = sorted(set(plain) - set(alphabet))
            if unknown:
                raise DreamError(f"character {unknown[0]!r} is not in this model's alphabet {alphabet!r}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ids; ids outside the tokenizer's range are dropped (Dream's head is wider than its vocab)."""
        limit = self.vocab_size
        return self._tok.decode([i for i in ids if 0 <= i < limit], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id (None outside the range)."""
        return self._tok.id_to_token(token_id) if 0 <= token_id < self.vocab_size else None

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render the checkpoint's own chat template (Jinja, sandboxed) for the messages."""
        if not self.chat_template:
            raise DreamError("this tokenizer has no chat template (drop --chat, or use an Instruct checkpoint)")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise DreamError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
        try:
            template = env.from_string(self.chat_template)
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                   bos_token=_token_content(self.config.get("bos_token")) or "",
                                   eos_token=_token_content(self.config.get("eos_token")) or "")
        except TemplateError as exc:
            raise DreamError(f"chat template failed: {exc}") from None


# Qwen2's order (end of text, chat, fill-in-the-middle sentinels), then Dream's mask token last. The FIM sentinels
# are for AR baselines trained in prefix-suffix-middle form; diffusion models never need them.
FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
FIM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, "<|mask|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, fim: bool = False) -> DreamTokenizer:
    """Train a Qwen2-style byte-level BPE on texts and append Dream's special tokens after it (with a chat
    template), the layout real Dream tokenizers have; `fim` adds Qwen2's fill-in-the-middle sentinels before
    <|mask|> (for AR baselines trained with data.fim_rate)."""
    specials = FIM_SPECIALS if fim else SPECIALS
    probe = qwen2_bpe({}, [])  # same normalizer/pre-tokenizer/decoder as the real format
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = probe.normalizer, probe.pre_tokenizer, probe.decoder
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    base = tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    config = {
        "added_tokens_decoder": {
            str(base + i): {"content": s, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                            "single_word": False}
            for i, s in enumerate(specials)
        },
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "mask_token": "<|mask|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 2048,
        "tokenizer_class": "DreamTokenizer",
    }
    return DreamTokenizer(tok, config)
