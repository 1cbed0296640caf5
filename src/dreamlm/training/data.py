"""Training data: packed pretraining blocks (streamed from text/JSONL files), SFT and puzzle examples, and a
character tokenizer for puzzles. Every source is deterministic given (seed, position) and resumes exactly.

A batch is `Batch(x (B, L), maskable (B, L), ar_targets (B, L), index (B,))`: `maskable` is what the diffusion
forward process may mask, `ar_targets` what an AR baseline is trained to predict, `index` the global example number
(the trainer seeds each example's noise with it, so results do not depend on how batches are split over ranks).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel

from dreamlm.errors import DreamError
from dreamlm.files import read_text, text_file
from dreamlm.tokenizer import DreamTokenizer

CHAR_SPECIALS = ["<|pad|>", "<|endoftext|>", "<|mask|>", "<|sep|>"]


def expand_words(entries: list[str] | tuple[str, ...]) -> list[str]:
    """Word entries of a character tokenizer: literal strings, "A..B" for the decimal numbers A to B, or
    "A..B>C..D" for every pair `a>b` of distinct numbers a in A..B, b in C..D (edge tokens of star graphs)."""
    words: list[str] = []
    for entry in entries:
        match = re.fullmatch(r"([0-9]+)\.\.([0-9]+)", entry)
        pairs = re.fullmatch(r"([0-9]+)\.\.([0-9]+)>([0-9]+)\.\.([0-9]+)", entry)
        if pairs:
            lo1, hi1, lo2, hi2 = map(int, pairs.groups())
            if lo1 > hi1 or lo2 > hi2:
                raise DreamError(f"word range {entry!r} is empty")
            words.extend(f"{a}>{b}" for a in range(lo1, hi1 + 1) for b in range(lo2, hi2 + 1) if a != b)
        elif match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if lo > hi:
                raise DreamError(f"word range {entry!r} is empty")
            words.extend(str(n) for n in range(lo, hi + 1))
        elif not entry:
            raise DreamError("tokenizer words must not be empty")
        else:
            words.append(entry)
    return list(dict.fromkeys(words))


def char_tokenizer(alphabet: str, words: list[str] | tuple[str, ...] = ()) -> DreamTokenizer:
    """One id per character of `alphabet` after the specials <|pad|> <|endoftext|> <|mask|> <|sep|>; `words`
    (see expand_words) become single tokens too, matched longest first (e.g. "10..99": a two-digit node name is
    one token, so a graph's edge is three tokens)."""
    expanded = expand_words(words)
    chars = sorted(set(alphabet) | {w for w in expanded if len(w) == 1})  # a one-character word is a character
    multi = sorted((w for w in expanded if len(w) > 1), key=lambda w: (-len(w), w))
    vocab = {tok: i for i, tok in enumerate(CHAR_SPECIALS)}
    for piece in chars + multi:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<|pad|>"))
    pattern = "(?m)" + "|".join([*(re.escape(w) for w in multi), "."])  # (?m): "." matches newlines too (Oniguruma)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in CHAR_SPECIALS])
    config = {"eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "mask_token": "<|mask|>",
              "sep_token": "<|sep|>", "tokenizer_class": "CharTokenizer", "alphabet": "".join(chars)}
    if multi:
        config["words"] = multi
    return DreamTokenizer(tok, config)


@dataclass
class Batch:
    """One micro-batch of token ids with its masking rules."""

    x: torch.Tensor
    maskable: torch.Tensor
    ar_targets: torch.Tensor
    index: torch.Tensor


def stdlib_root() -> Path:
    """The running Python's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_split(valid_share: float = 0.05) -> tuple[list[Path], list[Path]]:
    """The running Python's standard-library .py files (no tests, no idlelib), split by a hash of each module's
    path into train and held-out *modules*: a real code corpus on every machine."""
    train_files, valid_files = _stdlib_split(valid_share)
    return list(train_files), list(valid_files)


@functools.cache  # the walk takes seconds and the files never change while a process runs
def _stdlib_split(valid_share: float) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "test", "tests", "idlelib"} & set(p.relative_to(root).parts))
    train_files, valid_files = [], []
    for p in files:
        h = int(hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest()[:8], 16) / 16**8
        (valid_files if h < valid_share else train_files).append(p)
    return tuple(train_files), tuple(valid_files)


def resolve_files(entries: list[str]) -> list[Path]:
    """Data entries → files: `stdlib:train` / `stdlib:valid`, glob patterns, directories (all files below), files."""
    files: list[Path] = []
    for entry in entries:
        if entry in ("stdlib:train", "stdlib:valid"):
            files += stdlib_split()[entry == "stdlib:valid"]
        elif any(ch in entry for ch in "*?["):
            matched = sorted(Path(m) for m in glob.glob(entry, recursive=True))
            if not matched:
                raise DreamError(f"data pattern {entry!r} matches no file")
            files += [p for p in matched if p.is_file()]
        elif Path(entry).is_dir():
            found = sorted(p for p in Path(entry).rglob("*") if p.is_file())
            if not found:
                raise DreamError(f"data folder {entry} holds no files")
            files += found
        else:
            files.append(Path(entry))
    return files


def check_data_files(files: list[Path]) -> list[Path]:
    """Every data file exists and is UTF-8 text, checked in full before training starts (one streamed read;
    a binary, UTF-16 or Latin-1 file deep in a corpus fails now, not in a later epoch)."""
    if not files:
        raise DreamError("no data files given")
    for file in files:
        text_file(file, "data file")
    if not any(file.stat().st_size for file in files):
        raise DreamError(f"the data files ({', '.join(map(str, files[:3]))}{', ...' if len(files) > 3 else ''}) "
                         "are empty")
    return files


def read_documents(files: list[Path]) -> Iterator[str]:
    """Texts of the files in order: a .jsonl line's "text" (or the whole line's string), else the whole file."""
    for file in files:
        text_file(file, "data file")
        if file.suffix == ".jsonl":
            with file.open(encoding="utf-8-sig") as fh:
                for n, line in enumerate(fh, start=1):
                    if line.strip():
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError:
                            raise DreamError(f"{file} line {n} is not JSON") from None
                        if isinstance(obj, dict) and not isinstance(obj.get("text"), str):
                            raise DreamError(f"{file} line {n}: an object needs a \"text\" string")
                        yield obj["text"] if isinstance(obj, dict) else str(obj)
        else:
            yield read_text(file, "data file")


class PackedBlocks:
    """Pretraining stream: documents (shuffled per epoch) → ids + EOS → packed blocks of `seq_len`, endlessly.

    Streaming: only one document and one block are held at a time. Position 0 of a block is never maskable.
    """

    def __init__(self, files: list[Path], tokenizer: DreamTokenizer, seq_len: int, seed: int = 0,
                 rank: int = 0, world: int = 1, fim_rate: float = 0.0) -> None:
        if seq_len < 2:
            raise DreamError("seq_len must be at least 2")
        self.fim: tuple[int, int, int] | None = None
        if fim_rate > 0:
            from dreamlm.tokenizer import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX

            ids = [tokenizer.token_to_id(s) for s in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE)]
            if None in ids:
                raise DreamError("data.fim_rate needs a tokenizer with <|fim_prefix|>, <|fim_suffix|> and "
                                 "<|fim_middle|> (dreamlm train-tokenizer makes them)")
            if seq_len < 8:
                raise DreamError("fill-in-the-middle blocks need seq_len >= 8")
            self.fim = (ids[0], ids[1], ids[2])
        self.fim_rate = fim_rate
        if not files:
            raise DreamError("no training files given")
        self.files, self.tokenizer, self.seq_len, self.seed = list(files), tokenizer, seq_len, seed
        self.rank, self.world = rank, world
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise DreamError("the tokenizer has no EOS token to separate documents")
        self.emitted = 0  # blocks handed out (all ranks), the resume position
        self._stream: Iterator[list[int]] | None = None

    def _blocks(self) -> Iterator[list[int]]:
        epoch = 0
        while True:
            order = list(range(len(self.files)))
            random.Random(self.seed * 1000003 + epoch).shuffle(order)
            buf: list[int] = []
            produced = False
            for doc in read_documents([self.files[i] for i in order]):
                buf.extend(self.tokenizer.encode(doc) + [self.eos])
                while len(buf) >= self.seq_len:
                    yield buf[: self.seq_len]
                    buf = buf[self.seq_len:]
                    produced = True
            if not produced:
                raise DreamError(f"the training files hold fewer than seq_len={self.seq_len} tokens")
            epoch += 1

    def next_batch(self, batch_size: int) -> Batch:
        """The next `batch_size` blocks of this rank (each global block goes to rank = index % world)."""
        if self._stream is None:
            self._stream = self._blocks()
            for _ in range(self.emitted):  # replay to the resume position: exact, costs one pass of tokenizing
                next(self._stream)
        rows, index = [], []
        while len(rows) < batch_size:
            block = next(self._stream)
            if self.emitted % self.world == self.rank:
                rows.append(self._fim(block, self.emitted) if self.fim else block)
                index.append(self.emitted)
            self.emitted += 1
        x = torch.tensor(rows, dtype=torch.long)
        maskable = torch.ones_like(x, dtype=torch.bool)
        maskable[:, 0] = False
        return Batch(x, maskable, maskable.clone(), torch.tensor(index))

    def _fim(self, block: list[int], index: int) -> list[int]:
        """With probability fim_rate (seeded by the block's number), the block in prefix-suffix-middle form:
        its first seq_len - 3 tokens cut at two uniform points, <|fim_prefix|> P <|fim_suffix|> S <|fim_middle|> M
        (the same length; the last 3 tokens are dropped). Otherwise the block as it is."""
        assert self.fim is not None
        rng = random.Random(self.seed * 1000003 + index * 7 + 1)
        if rng.random() >= self.fim_rate:
            return block
        body = block[: self.seq_len - 3]
        i, j = sorted(rng.randint(0, len(body)) for _ in range(2))
        pre, suf, mid = self.fim
        return [pre, *body[:i], suf, *body[j:], mid, *body[i:j]]

    def state_dict(self) -> dict:
        """Resume position."""
        return {"emitted": self.emitted}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position."""
        self.emitted, self._stream = int(state["emitted"]), None


@dataclass
class Example:
    """A prompt (never masked) and a response (masked and trained, EOS included)."""

    prompt: list[int]
    response: list[int]


def read_examples(file: Path, tokenizer: DreamTokenizer, chat: bool, separator: str = "",
                  transform: Callable[[str, str], tuple[str, str]] | None = None) -> list[Example]:
    """JSONL of {"prompt","response"}, {"input","output"} or {"messages": [...]} → token examples (+EOS);
    `transform` maps each {input, output} pair first (a planning task's model view)."""
    text_file(file, "data file")
    eos = tokenizer.eos_token_id
    out = []
    with file.open(encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise DreamError(f"{file} line {n} is not JSON") from None
            if not isinstance(obj, dict):
                raise DreamError(f"{file} line {n}: expected an object with prompt/response, input/output or "
                                 "messages")
            msgs = obj.get("messages", [])
            if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                     for m in msgs):
                raise DreamError(f"{file} line {n}: messages must be a list of {{\"role\", \"content\"}} objects")
            if not all(isinstance(obj[k], str) for k in ("prompt", "response", "input", "output") if k in obj):
                raise DreamError(f"{file} line {n}: every prompt, response, input, output and message content must "
                                 "be a string")
            if "messages" in obj:
                msgs = obj["messages"]
                if not msgs or msgs[-1].get("role") != "assistant":
                    raise DreamError(f"{file} line {n}: the last message must be the assistant's")
                prompt_msgs, response = msgs[:-1], msgs[-1]["content"]
            elif "prompt" in obj and "response" in obj:
                prompt_msgs, response = [{"role": "user", "content": obj["prompt"]}], obj["response"]
            elif "input" in obj and "output" in obj:
                try:
                    text_in, response = (obj["input"], obj["output"]) if transform is None else \
                        transform(obj["input"], obj["output"])
                except DreamError as err:
                    raise DreamError(f"{file} line {n}: {err}") from None
                prompt_msgs = [{"role": "user", "content": text_in}]
            else:
                raise DreamError(f"{file} line {n}: expected prompt/response, input/output or messages")
            if chat:
                prompt = tokenizer.apply_chat_template(prompt_msgs)
            else:
                prompt = "".join(m["content"] for m in prompt_msgs)
            try:
                out.append(Example(tokenizer.encode(prompt + separator), tokenizer.encode(response) + [eos]))
            except DreamError as err:
                raise DreamError(f"{file} line {n}: {err}") from None
    if not out:
        raise DreamError(f"{file} holds no examples")
    return out


class ExampleBatches:
    """SFT/puzzle batches: shuffled per epoch, right-padded to `seq_len` (pad tail maskable, as Dream trains EOS
    filling), optionally truncated per batch at a random length to curb the short-answer bias."""

    def __init__(self, examples: list[Example], seq_len: int, pad_token_id: int, seed: int = 0,
                 random_truncation: bool = False, rank: int = 0, world: int = 1) -> None:
        if not examples:
            raise DreamError("no training examples")
        too_long = [i for i, e in enumerate(examples) if len(e.prompt) + len(e.response) > seq_len]
        if too_long:
            e = examples[too_long[0]]
            raise DreamError(f"{len(too_long)} example(s) do not fit seq_len={seq_len} (the first, #{too_long[0]}, "
                             f"needs {len(e.prompt) + len(e.response)}); raise seq_len")
        if any(not e.prompt for e in examples):
            raise DreamError("an example has an empty prompt (position 0 must be a real token)")
        self.examples, self.seq_len, self.pad = examples, seq_len, pad_token_id
        self.seed, self.random_truncation, self.rank, self.world = seed, random_truncation, rank, world
        self.emitted = 0
        self._cached: tuple[int, list[int]] = (-1, [])

    def _order(self, epoch: int) -> list[int]:
        if self._cached[0] != epoch:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1000003 + epoch).shuffle(order)
            self._cached = (epoch, order)
        return self._cached[1]

    def next_batch(self, batch_size: int) -> Batch:
        """The next `batch_size` examples of this rank."""
        start = self.emitted  # the same on every rank: all ranks count every example
        chosen: list[tuple[int, Example]] = []
        while len(chosen) < batch_size:
            epoch, pos = divmod(self.emitted, len(self.examples))
            if self.emitted % self.world == self.rank:
                chosen.append((self.emitted, self.examples[self._order(epoch)[pos]]))
            self.emitted += 1
        x = torch.full((batch_size, self.seq_len), self.pad, dtype=torch.long)
        maskable = torch.zeros_like(x, dtype=torch.bool)
        ar = torch.zeros_like(maskable)
        longest = 0
        for row, (_, e) in enumerate(chosen):
            p, r = len(e.prompt), len(e.response)
            x[row, :p] = torch.tensor(e.prompt)
            x[row, p:p + r] = torch.tensor(e.response)
            maskable[row, p:] = True
            ar[row, p:p + r] = True
            longest = max(longest, p + r)
        if self.random_truncation and longest < self.seq_len:
            cut = random.Random(self.seed * 7919 + start).randint(longest, self.seq_len)
            x, maskable, ar = x[:, :cut], maskable[:, :cut], ar[:, :cut]
        return Batch(x, maskable, ar, torch.tensor([i for i, _ in chosen]))

    def state_dict(self) -> dict:
        """Resume position."""
        return {"emitted": self.emitted}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position."""
        self.emitted = int(state["emitted"])


class MixedBatches:
    """Packed pretraining blocks with a fixed share of SFT examples in every batch (Dream-SFT rows: prompt clean,
    response and EOS padding maskable), e.g. code plus chat answers. Each batch takes round(share · B) rows from
    `extra`, the rest from `main`; both keep their own resume positions. Extra rows' example indices are offset so
    their noise draws never coincide with a main row's."""

    OFFSET = 10 ** 12

    def __init__(self, main: "PackedBlocks", extra: ExampleBatches, share: float) -> None:
        if not 0 < share < 1:
            raise DreamError("data.sft_share must be in (0, 1)")
        if extra.seq_len != main.seq_len:
            raise DreamError("the SFT mix must use the packed blocks' seq_len")
        self.main, self.extra, self.share = main, extra, share

    def next_batch(self, batch_size: int) -> Batch:
        """round(share · batch_size) SFT rows after the packed rows."""
        k = min(batch_size - 1, round(self.share * batch_size)) if batch_size > 1 else 0
        a = self.main.next_batch(batch_size - k)
        if k == 0:
            return a
        b = self.extra.next_batch(k)
        return Batch(torch.cat([a.x, b.x]), torch.cat([a.maskable, b.maskable]),
                     torch.cat([a.ar_targets, b.ar_targets]), torch.cat([a.index, b.index + self.OFFSET]))

    def state_dict(self) -> dict:
        """Both resume positions."""
        return {"main": self.main.state_dict(), "extra": self.extra.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from saved positions."""
        self.main.load_state_dict(state["main"])
        self.extra.load_state_dict(state["extra"])
