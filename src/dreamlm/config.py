"""DreamConfig: the model's shape and special ids, read from and written to a HF `config.json`."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dreamlm.errors import DreamError
from dreamlm.files import read_text

# Dream's usable context (prompt + output); longer inputs are refused even if RoPE could reach further.
DREAM_CONTEXT = 2048

SUPPORTED_MODEL_TYPES = ("Dream", "qwen2")

# Keys a real HF config carries that say nothing about the computation; kept verbatim and written back.
HF_EXTRAS = frozenset(
    {
        "architectures",
        "auto_map",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "use_cache",
        "layer_types",
        "_name_or_path",
        "_attn_implementation_autoset",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "use_return_dict",
        "torchscript",
        "use_bfloat16",
        "tie_encoder_decoder",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "add_cross_attention",
        "pruned_heads",
        "problem_type",
        "id2label",
        "label2id",
        "tokenizer_class",
        "prefix",
        "sep_token_id",
        "decoder_start_token_id",
        "task_specific_params",
        "finetuning_task",
        "cross_attention_hidden_size",
    }
)


def _field_types(hint: str) -> tuple[type, ...]:
    table = {"int": int, "float": (int, float), "bool": bool, "str": str, "dict": dict, "None": type(None)}
    kinds: list[type] = []
    for part in hint.replace(" ", "").split("|"):
        kind = table.get(part)
        if kind is None:
            return ()
        kinds += list(kind) if isinstance(kind, tuple) else [kind]
    return tuple(kinds)


def _type_names(kinds: tuple[type, ...]) -> str:
    names = {bool: "true or false", int: "an integer", str: "a string", dict: "an object", type(None): "null"}
    words = ["a number" if float in kinds else names[k] for k in kinds if not (float in kinds and k is int)]
    return " or ".join(dict.fromkeys(words))


@dataclass
class DreamConfig:
    """Shape, RoPE and special ids of a Dream (bidirectional Qwen2) model; defaults are Dream-v0-7B's."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    attention_bias: bool = True  # q/k/v bias (Qwen2); o_proj never has one
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    mask_token_id: int | None = 151666
    pad_token_id: int | None = 151643
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151643
    # DreamOn's length states (dreamlm.sampling: an expand becomes two masks, a delete is removed); None in a
    # checkpoint trained without them, which then infills only at the length it is given
    expand_token_id: int | None = None
    delete_token_id: int | None = None
    model_type: str = "Dream"
    causal: bool = False  # dreamlm extension: True makes the same module an AR baseline
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived -------------------------------------------------------------------------------------------
    @property
    def dim_per_head(self) -> int:
        """Head dimension D (explicit `head_dim` or hidden_size / heads)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def context_length(self) -> int:
        """Longest canvas (prompt + output) the model accepts."""
        return min(self.max_position_embeddings, DREAM_CONTEXT)

    # ---- checks --------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise DreamError if the numbers cannot describe a model."""
        for f in dataclasses.fields(self):  # JSON types first: "false" (a string) must never pass for false
            value, kinds = getattr(self, f.name), FIELD_TYPES.get(f.name)
            if kinds is not None and not (isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))):
                raise DreamError(f"config: {f.name} must be {_type_names(kinds)}, got {value!r}")
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DreamError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise DreamError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise DreamError(
                f"config: hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}) unless head_dim is given"
            )
        if self.dim_per_head % 2:
            raise DreamError(f"config: the head dimension must be even for RoPE, got {self.dim_per_head}")
        if self.hidden_act != "silu":
            raise DreamError(f"config: hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.rope_scaling not in (None, {}) and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) != "default":
            raise DreamError(f"config: rope_scaling {self.rope_scaling!r} is not supported (only plain RoPE)")
        if self.use_sliding_window:
            raise DreamError("config: use_sliding_window=true is not supported (Dream attends to the whole canvas)")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise DreamError(f"config: rope_theta must be a positive number, got {self.rope_theta!r}")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise DreamError(f"config: rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        for name in ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id", "expand_token_id",
                     "delete_token_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise DreamError(f"config: {name}={value!r} is outside the vocabulary (0..{self.vocab_size - 1})")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise DreamError(
                f"config: unknown model_type {self.model_type!r}; dreamlm reads {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

    # ---- dict / json ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DreamConfig":
        """Build from a config.json dict; unknown keys are an error, known HF extras pass through."""
        if not isinstance(data, dict):
            raise DreamError("config: expected a JSON object")
        data = dict(data)
        model_type = data.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise DreamError(
                f"config: unknown model_type {model_type!r}; dreamlm reads {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        rope = data.pop("rope_parameters", None)  # transformers >= 5 keeps theta and scaling here
        if isinstance(rope, dict):
            data.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                data.setdefault("rope_scaling", rope)
        if model_type == "qwen2":
            data.setdefault("rope_theta", 10000.0)  # Qwen2Config's default, not Dream's
            data.setdefault("mask_token_id", None)
            data.setdefault("causal", True)  # a Qwen2 checkpoint is an AR model; `dreamlm convert` makes it Dream
            for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
                data.setdefault(name, None)
        if isinstance(data.get("eos_token_id"), list):  # Qwen2.5 instruct lists several; the first ends text
            ids = data["eos_token_id"]
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise DreamError("config.json: eos_token_id must be a token id or a non-empty list of token ids, "
                                 f"got {ids!r}")
            data["extras_eos_token_ids"] = data["eos_token_id"]
            data["eos_token_id"] = data["eos_token_id"][0]
        names = {f.name for f in dataclasses.fields(cls)} - {"extras"}
        known = {k: v for k, v in data.items() if k in names}
        extras = {k: v for k, v in data.items() if k in HF_EXTRAS or k == "extras_eos_token_ids"}
        unknown = sorted(set(data) - set(known) - set(extras))
        if unknown:
            raise DreamError(f"config: unknown key(s) {', '.join(unknown)}")
        if known.get("rope_scaling") is not None and not isinstance(known["rope_scaling"], dict):
            raise DreamError(f"config: rope_scaling must be an object or null, got {known['rope_scaling']!r}")
        return cls(**known, extras=extras)

    def to_dict(self) -> dict[str, Any]:
        """The config.json dict (Dream's layout; `causal` only when set)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extras", "causal")}
        if out["head_dim"] is None:
            del out["head_dim"]
        for name in ("expand_token_id", "delete_token_id"):  # only a model trained with the length states has them
            if out[name] is None:
                del out[name]
        if out["attention_bias"]:  # Qwen2's layout has no such key: bias is implied
            del out["attention_bias"]
        if self.causal and self.model_type != "qwen2":  # a qwen2 checkpoint is causal without saying so
            out["causal"] = True
        if self.model_type == "qwen2" and out["mask_token_id"] is None:
            del out["mask_token_id"]
        extras = dict(self.extras)
        eos_list = extras.pop("extras_eos_token_ids", None)
        if eos_list is not None:
            out["eos_token_id"] = eos_list
        out.update(extras)
        out["architectures"] = ["DreamModel"] if self.model_type == "Dream" else ["Qwen2ForCausalLM"]
        return dict(sorted(out.items()))

    @classmethod
    def from_json_file(cls, path: str | Path) -> "DreamConfig":
        """Read config.json, with errors that name the file."""
        path = Path(path)
        if not path.is_file():
            raise DreamError(f"no config.json in {path.parent} (is this a model directory?)")
        try:
            data = json.loads(read_text(path, "model config"))
        except json.JSONDecodeError as exc:
            raise DreamError(f"{path} is not valid JSON: {exc}") from None
        try:
            return cls.from_dict(data)
        except TypeError as exc:  # a value of the wrong JSON type reaching a comparison
            raise DreamError(f"{path}: bad value ({exc})") from None

    def to_json_file(self, path: str | Path) -> None:
        """Write config.json."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @property
    def length_states(self) -> bool:
        """True when the model has DreamOn's expand and delete tokens (it can change an infill's length)."""
        return self.expand_token_id is not None and self.delete_token_id is not None

    def generation_dict(self) -> dict[str, Any]:
        """The generation_config.json dict: the special ids the sampler needs."""
        return {
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "mask_token_id": self.mask_token_id,
        }


# The JSON type each config.json key must have, from the dataclass annotations ("int | None", "float", ...).
FIELD_TYPES = {f.name: kinds for f in dataclasses.fields(DreamConfig) if (kinds := _field_types(str(f.type)))}
