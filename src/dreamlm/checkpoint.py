"""HF-format checkpoint directories: load without a second copy in RAM, save (sharded) atomically."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from dreamlm.config import DreamConfig
from dreamlm.errors import DreamError
from dreamlm.files import as_path, output_dir, read_text
from dreamlm.model import DreamModel
from dreamlm.tokenizer import DELETE, EXPAND, MASK, DreamTokenizer, has_tokenizer_files

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some exported checkpoints carry that are recomputed, never learned.
IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class TensorEntry:
    """Where one stored tensor lives, and its header facts."""

    file: Path
    shape: tuple[int, ...]
    dtype: str


@dataclass
class CheckpointInfo:
    """What a checkpoint directory holds, read from headers only (no weights loaded)."""

    path: Path
    config: DreamConfig
    tensors: dict[str, TensorEntry]
    has_tokenizer: bool

    @property
    def num_parameters(self) -> int:
        """Stored parameter count."""
        total = 0
        for entry in self.tensors.values():
            n = 1
            for d in entry.shape:
                n *= d
            total += n
        return total

    @property
    def dtypes(self) -> list[str]:
        """Distinct stored dtypes."""
        return sorted({e.dtype for e in self.tensors.values()})

    @property
    def size_bytes(self) -> int:
        """Bytes of weight files on disk."""
        return sum(f.stat().st_size for f in {e.file for e in self.tensors.values()})


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a name such as 'bf16'; None stays None (keep the stored dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise DreamError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: torch.device | str | None) -> torch.device:
    """A torch device this machine has (None: the CPU); DreamError for an unknown name or a missing GPU."""
    if device is None:
        return torch.device("cpu")
    try:
        where = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DreamError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise DreamError(f"device {device}: CUDA is not available on this machine (use cpu)")
        if where.index is not None and where.index >= torch.cuda.device_count():
            raise DreamError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif where.type != "cpu":
        raise DreamError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return where


def inspect_checkpoint(path: str | Path, config: DreamConfig | None = None) -> CheckpointInfo:
    """Read config and safetensors headers of a model directory, with errors that say what is wrong.

    `config` replaces the directory's config.json (conversion reads AR configs itself)."""
    path = as_path(path, "model directory")
    if not path.exists():
        raise DreamError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise DreamError(f"{path} is not a directory (expected a model directory with config.json)")
    if config is None:
        config = DreamConfig.from_json_file(path / "config.json")
    if (path / INDEX_FILE).is_file():
        try:
            index = json.loads(read_text(path / INDEX_FILE, "weight index"))
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, KeyError, AssertionError, TypeError):
            raise DreamError(f"{path / INDEX_FILE} is malformed (expected a JSON object with 'weight_map')") from None
        files = sorted(set(weight_map.values()))
    elif (path / SINGLE_FILE).is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        raise DreamError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
    tensors: dict[str, TensorEntry] = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise DreamError(f"{INDEX_FILE} names {name}, which is missing from {path}")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    tensors[key] = TensorEntry(file, tuple(sl.get_shape()), str(sl.get_dtype()))
        except (SafetensorError, OSError) as exc:
            raise DreamError(f"{file} is not a readable safetensors file: {exc}") from None
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in tensors or tensors[key].file.name != name:
                raise DreamError(f"{INDEX_FILE} says tensor {key} is in {name}, but it is not there")
    return CheckpointInfo(path, config, tensors, has_tokenizer_files(path))


def _expected_tensors(model: nn.Module, tied: bool) -> dict[str, tuple[int, ...]]:
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    if tied:
        shapes.pop("lm_head.weight", None)
    return shapes


def _check_names_and_shapes(info: CheckpointInfo, expected: dict[str, tuple[int, ...]]) -> None:
    stored = {k for k in info.tensors if not IGNORED_TENSORS.fullmatch(k)}
    missing = sorted(set(expected) - stored)
    unexpected = sorted(stored - set(expected) - {"lm_head.weight"})
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise DreamError(f"checkpoint {info.path} is missing tensor {', '.join(missing[:3])}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise DreamError(f"checkpoint {info.path} has unexpected tensor {', '.join(unexpected[:3])}{more}")
    for name, shape in expected.items():
        if info.tensors[name].shape != shape:
            raise DreamError(
                f"tensor {name} has shape {list(info.tensors[name].shape)} in the checkpoint, "
                f"but the config needs {list(shape)}"
            )


def _check_shape_keys(info: CheckpointInfo) -> None:
    """The config's shape against a few stored tensors, before any module is built: a config.json that says
    10**9 layers or a 10**30-wide model must be refused, not built (even on the meta device)."""
    c, stored = info.config, info.tensors
    layers = {int(m.group(1)) for m in (re.match(r"model\.layers\.(\d+)\.", k) for k in stored) if m}
    if len(layers) != c.num_hidden_layers:
        raise DreamError(f"config.json of {info.path} says num_hidden_layers={c.num_hidden_layers}, but the "
                         f"checkpoint holds {len(layers)} layers")
    D = c.dim_per_head
    for name, shape in (("model.embed_tokens.weight", (c.vocab_size, c.hidden_size)),
                        ("model.layers.0.self_attn.q_proj.weight", (c.num_attention_heads * D, c.hidden_size)),
                        ("model.layers.0.self_attn.k_proj.weight", (c.num_key_value_heads * D, c.hidden_size)),
                        ("model.layers.0.mlp.gate_proj.weight", (c.intermediate_size, c.hidden_size))):
        if name in stored and stored[name].shape != shape:
            raise DreamError(f"tensor {name} has shape {list(stored[name].shape)} in the checkpoint, but the config "
                             f"needs {list(shape)}")


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())


def load_pretrained(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                    causal: bool | None = None) -> DreamModel:
    """Load a model directory; each tensor is read once and placed directly (peak RAM ≈ model + one tensor). An
    adapter directory loads its base and merges the adapter into it (in float32, then cast to `dtype`)."""
    from dreamlm.adapter import apply_adapter, is_adapter_dir

    path = as_path(path, "model directory")
    if is_adapter_dir(path):
        base = adapter_base(path)
        model = load_from_info(inspect_checkpoint(base), dtype=torch.float32, causal=causal)
        apply_adapter(model, path)
        target = resolve_dtype(dtype)
        if target is not None and target != torch.float32:
            model.to(target)
        return model.to(device) if device is not None else model
    return load_from_info(inspect_checkpoint(path), dtype=dtype, device=device, causal=causal)


def adapter_base(path: str | Path) -> Path:
    """The base model directory an adapter names: a path (absolute, or relative to the adapter) or a model name."""
    from dreamlm.adapter import read_adapter_config

    ref = read_adapter_config(path)["base_model_name_or_path"]
    for candidate in (Path(path) / ref, Path(ref)):
        if (candidate / "config.json").is_file():
            return candidate
    from dreamlm.hub import resolve

    return Path(resolve(ref))  # a model name (e.g. smollm2-base); DreamError naming the known names if unknown


def load_from_info(info: CheckpointInfo, dtype: torch.dtype | str | None = None,
                   device: torch.device | str | None = None, causal: bool | None = None) -> DreamModel:
    """Materialise the model an inspected checkpoint describes."""
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    _check_shape_keys(info)
    with torch.device("meta"):
        model = DreamModel(info.config, causal=causal)
    tied = info.config.tie_word_embeddings
    expected = _expected_tensors(model, tied)
    _check_names_and_shapes(info, expected)
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(info.tensors[name].file, []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in names:
                tensor = f.get_tensor(name)
                if not tensor.is_floating_point():
                    raise DreamError(f"{file.name}: {name} holds {str(tensor.dtype).replace('torch.', '')} values; "
                                     "weights must be floating point")
                if not bool(torch.isfinite(tensor).all()):
                    raise DreamError(f"{file.name}: {name} holds NaN or infinite values; the checkpoint is broken")
                if dtype is not None and tensor.dtype != dtype:
                    tensor = tensor.to(dtype)
                _assign(model, name, tensor)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    if info.has_tokenizer:
        model.tokenizer = DreamTokenizer.from_pretrained(info.path)
    model.name_or_path = str(info.path)
    return model.eval()


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '200MB', '10KiB'."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise DreamError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE) \
        if isinstance(size, str) else None
    if not m:
        raise DreamError(f"cannot read size {size!r}; write e.g. '5GB' or '500MB'")
    unit = (m.group(2) or "B").upper()
    factor = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    size_bytes = int(float(m.group(1)) * factor)
    if size_bytes < 1:  # a zero size would write one file per tensor, never what was meant
        raise DreamError(f"max_shard_size must be at least one byte, got {size!r}")
    return size_bytes


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) then rename tmp over path, so a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def shard_names(state: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Group tensor names, in order, into shards of at most max_bytes (a bigger tensor gets its own shard)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def save_pretrained(model: DreamModel, path: str | Path, max_shard_size: int | str = "5GB",
                    tokenizer: DreamTokenizer | None = None) -> None:
    """Write a Dream-format directory; files are replaced atomically and stale weight files removed last."""
    path = output_dir(path)  # a file, a path under a file, an unwritable folder: refused before anything is written
    max_bytes = parse_size(max_shard_size)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = model.config
    config.extras["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    config.extras.pop("dtype", None)
    shards = shard_names(state, max_bytes)
    written: list[str] = []
    if len(shards) == 1:
        atomic_write(path / SINGLE_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
        written.append(SINGLE_FILE)
    else:
        weight_map = {}
        for i, names in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            part = {n: state[n] for n in names}
            atomic_write(path / fname, lambda tmp, part=part: save_file(part, str(tmp), metadata={"format": "pt"}))
            weight_map.update(dict.fromkeys(names, fname))
            written.append(fname)
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": weight_map}
        atomic_write(path / INDEX_FILE, lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"))
        written.append(INDEX_FILE)
    atomic_write(path / "config.json", config.to_json_file)
    gen = json.dumps(config.generation_dict(), indent=2) + "\n"
    atomic_write(path / "generation_config.json", lambda tmp: tmp.write_text(gen))
    for stale in path.glob("model*.safetensors*"):
        if stale.name not in written:
            stale.unlink()
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


# ---- AR -> diffusion conversion ---------------------------------------------------------------------------------
LLAMA_ONLY_KEYS = {"mlp_bias", "pretraining_tp", "head_dim", "attention_bias"}
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def ar_config_to_dream(data: dict) -> dict:
    """A causal Qwen2 / Llama config.json dict → Dream's (same module tree; Llama has no q/k/v bias)."""
    kind = data.get("model_type")
    if kind not in ("qwen2", "llama"):
        raise DreamError(f"convert reads causal qwen2 or llama checkpoints, not model_type {kind!r}")
    out = dict(data)
    missing = [k for k in SHAPE_KEYS if k not in out]
    if missing:  # never Dream-7B's defaults in their place: the weights would not fit, or fit the wrong shape
        raise DreamError(f"the {kind} config.json has no {', '.join(missing)}; it must give the model's shape "
                         f"({', '.join(SHAPE_KEYS)})")
    out.setdefault("num_key_value_heads", out["num_attention_heads"])  # HF's meaning when absent: no grouping
    if kind == "llama":
        if out.pop("mlp_bias", False):
            raise DreamError("this Llama has MLP biases (mlp_bias=true), which the Qwen2 block has no place for")
        if out.pop("pretraining_tp", 1) not in (1, None):
            raise DreamError("pretraining_tp != 1 is not supported")
        out["attention_bias"] = bool(out.get("attention_bias", False))
        for key in ("rope_scaling", "rope_parameters"):
            rope = out.get(key)
            if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
                raise DreamError(f"Llama {key} {rope!r} is not supported (plain RoPE only): refusing rather than "
                                 "producing a model whose positions differ from the original")
        out.setdefault("max_window_layers", out.get("num_hidden_layers", 0))
    # Dream's defaults (mask 151666, theta 1e6) must not leak into a model that never had them
    out["mask_token_id"] = None
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        out.setdefault(name, None)
    if "rope_theta" not in out and not isinstance(out.get("rope_parameters"), dict):
        out["rope_theta"] = 10000.0
    out["model_type"] = "Dream"
    out.pop("causal", None)
    return out


def model_from_tensors(config: DreamConfig, tensors: dict[str, torch.Tensor], source: str,
                       causal: bool | None = None) -> DreamModel:
    """A model from named tensors (HF names), checked against the config as a checkpoint is: every name, every shape.

    `source` names where the tensors came from, for the error messages."""
    with torch.device("meta"):
        model = DreamModel(config, causal=causal)
    expected = _expected_tensors(model, config.tie_word_embeddings)
    info = CheckpointInfo(Path(source), config,
                          {k: TensorEntry(Path(source), tuple(v.shape), str(v.dtype)) for k, v in tensors.items()},
                          has_tokenizer=False)
    _check_names_and_shapes(info, expected)
    for name in expected:
        _assign(model, name, tensors[name])
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def add_mask_token(model: DreamModel, tokenizer: DreamTokenizer, mask_token: str = MASK) -> int:
    """Give an AR model (just loaded under a Dream config) Dream's mask token and special ids; returns the mask id.

    The mask token is reused when the tokenizer has it; otherwise it is added as the next id, taking an unused
    embedding row if the matrix is wider than the tokenizer or growing embedding and head by one row (initialised to
    the mean row) if not. Existing rows of the head are never changed, so the causal logits are the source's.
    Unset pad / bos / eos ids become the tokenizer's end-of-text id. Every AR source (HF directory, GGUF) goes
    through here, so they all come out alike.
    """
    config = model.config
    mask_id = tokenizer.token_to_id(mask_token)
    if mask_id is None:
        mask_id = tokenizer.add_special_token(mask_token)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        if mask_id >= config.vocab_size:
            grow = mask_id + 1 - config.vocab_size
            # the mean in float32: a bf16 sum over ~50k rows would lose most of its bits
            mean = embed.float().mean(0, keepdim=True).to(embed.dtype)
            model.model.embed_tokens.weight = nn.Parameter(torch.cat([embed, mean.expand(grow, -1)]))
            head = model.lm_head.weight
            if config.tie_word_embeddings:
                model.lm_head.weight = model.model.embed_tokens.weight
            else:
                head_mean = head.float().mean(0, keepdim=True).to(head.dtype)
                model.lm_head.weight = nn.Parameter(torch.cat([head, head_mean.expand(grow, -1)]))
            config.vocab_size = mask_id + 1
        elif not config.tie_word_embeddings:
            embed[mask_id] = embed.float().mean(0).to(embed.dtype)  # an unused input row: give it a neutral start
    config.mask_token_id = mask_id
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if getattr(config, name) is None:
            setattr(config, name, tokenizer.eos_token_id)
    config.validate()
    return mask_id


def add_length_tokens(model: DreamModel, tokenizer: DreamTokenizer) -> tuple[int, int]:
    """Give a diffusion model DreamOn's `<|expand|>` and `<|delete|>` tokens; returns (expand id, delete id).

    Reused when the tokenizer has them, else added as the next ids. Each token takes an unused embedding row when
    the matrix is wider than the tokenizer, else embedding and head grow by a row. New rows start at the mean row
    (the same neutral start `add_mask_token` gives the mask): the head's mean row scores every context at the
    average logit, so an untrained model almost never asks to change the length, and every other row stays as it
    was (a model with the tokens added and not yet trained gives its old logits on every old id). DreamOn adds the
    two tokens in rows of Qwen2's embedding the tokenizer does not use; how it initialised them is not stated in its
    paper or released code, so this choice is ours. Both are never inputs: the sampler turns them into masks or
    removes them, and training always masks them."""
    config = model.config
    if config.mask_token_id is None:
        raise DreamError("add the mask token first (dreamlm convert): the length states are mask transitions")
    ids = []
    for content in (EXPAND, DELETE):
        token_id = tokenizer.token_to_id(content)
        if token_id is None:
            token_id = tokenizer.add_special_token(content)
        ids.append(token_id)
    if (config.expand_token_id, config.delete_token_id) == tuple(ids):
        return ids[0], ids[1]
    with torch.no_grad():
        embed, head = model.model.embed_tokens.weight.detach(), model.lm_head.weight.detach()
        if max(ids) >= config.vocab_size:
            grow = max(ids) + 1 - config.vocab_size
            embed = torch.cat([embed, embed.new_zeros(grow, embed.shape[1])])
            head = embed if config.tie_word_embeddings else torch.cat([head, head.new_zeros(grow, head.shape[1])])
            config.vocab_size = max(ids) + 1
        known = [i for i in range(embed.shape[0]) if i not in ids]
        for token_id in ids:
            embed[token_id] = embed[known].float().mean(0).to(embed.dtype)
            if not config.tie_word_embeddings:
                head[token_id] = head[known].float().mean(0).to(head.dtype)
        model.model.embed_tokens.weight = nn.Parameter(embed)
        model.lm_head.weight = model.model.embed_tokens.weight if config.tie_word_embeddings else nn.Parameter(head)
    config.expand_token_id, config.delete_token_id = ids
    config.validate()
    return ids[0], ids[1]


def convert_ar_checkpoint(src: str | Path, dst: str | Path, mask_token: str = MASK,
                          max_shard_size: int | str = "5GB", length_tokens: bool = False) -> DreamModel:
    """Turn a HF causal Qwen2/Llama directory into a Dream-format one: same weights, bidirectional, a mask token
    (placed by `add_mask_token`)."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise DreamError(f"no config.json in {src}")
    raw = DreamTokenizer._read_json(src / "config.json")
    config = DreamConfig.from_dict(ar_config_to_dream(raw))
    if not has_tokenizer_files(src):
        raise DreamError(f"{src} has no tokenizer files; convert needs them to place the mask token")
    tokenizer = DreamTokenizer.from_pretrained(src)
    # load through the normal path (peak RAM ≈ one model), from a config that says Dream
    model = load_from_info(inspect_checkpoint(src, config), causal=False)
    add_mask_token(model, tokenizer, mask_token)
    if length_tokens:
        add_length_tokens(model, tokenizer)
    model.save_pretrained(dst, max_shard_size=max_shard_size, tokenizer=tokenizer)
    model.tokenizer = tokenizer
    return model
