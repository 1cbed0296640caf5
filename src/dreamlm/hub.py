"""Model names: one resolver that every verb (and the server, eval, benches, training's init_from) goes through.

A model is named in one of three ways:
- a path to a model directory (always wins when it exists);
- a bundled name: a folder of the package's assets (`stdlib-code`, `tiny-dream`, `sudoku4-diffusion`, ...);
- a pulled name: a model `dreamlm pull` fetched into the user cache (`$DREAMLM_HOME`, default ~/.cache/dreamlm).

Cache layout after `dreamlm pull smollm2` (each folder a normal model directory):
    smollm2/           the converted SmolLM2 (Dream format: bidirectional, mask token added), pull.json
    smollm2/adapter/   (when shipped) an adapter directory over it; `-m smollm2` then means base + adapter,
                       and `smollm2-base` still the converted model alone
    smollm2-ar/        the same weights (hard links) with a causal config: the plain AR base, for baselines
A pull installs `smollm2-ar` first and `smollm2` last, so `smollm2` existing means the pull completed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dreamlm.errors import DreamError

DEFAULT_MODEL = "stdlib-code"
HOME_ENV = "DREAMLM_HOME"
ADAPTER_FOLDER = "adapter"


@dataclass(frozen=True)
class PulledName:
    """A name `dreamlm pull` provides: which pull makes it, the folder it lives in, what it is."""

    pull: str
    folder: str
    about: str
    causal: bool = False  # a folder of its own: the pull's weights (hard links) under a causal config


PULLED = {
    "smollm2": PulledName("smollm2", "smollm2", "SmolLM2-135M-Instruct as a diffusion model (Dream format)"),
    "smollm2-ar": PulledName("smollm2", "smollm2-ar", "SmolLM2-135M-Instruct, the plain causal (AR) base",
                             causal=True),
    "smollm2-base": PulledName("smollm2", "smollm2", "SmolLM2-135M-Instruct converted to Dream's format, before "
                                                     "adaptation (the base the shipped adapter names)"),
}


def cache_dir() -> Path:
    """Where pulled models live: $DREAMLM_HOME, else ~/.cache/dreamlm."""
    home = os.environ.get(HOME_ENV)
    return Path(home).expanduser() if home else Path.home() / ".cache" / "dreamlm"


def assets_dir() -> Path:
    """The package's bundled models."""
    return Path(str(resources.files("dreamlm") / "assets"))


def bundled_names() -> list[str]:
    """Names of the bundled model folders."""
    root = assets_dir()
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def pulled_dir(name: str) -> Path:
    """The cache folder of a pulled name (whether or not it has been pulled)."""
    return cache_dir() / PULLED[name].folder


def is_pulled(name: str) -> bool:
    """True if the pull that provides `name` completed (its last-installed folder exists)."""
    spec = PULLED[name]
    return (cache_dir() / spec.pull / "config.json").is_file() and (pulled_dir(name) / "config.json").is_file()


def _pulled_path(name: str) -> Path:
    if not is_pulled(name):
        raise DreamError(f"model {name!r} has not been pulled yet; run `dreamlm pull {PULLED[name].pull}` "
                         f"(it will live in {cache_dir()})")
    path = pulled_dir(name)
    adapter = path / ADAPTER_FOLDER
    if name == PULLED[name].pull and (adapter / "adapter_config.json").is_file():
        return adapter  # the shipped adapter over the pulled base (an adapter directory loads its base itself)
    return path


def default_model() -> str:
    """The model a verb uses when none is named: the adapted SmolLM2 once pulled, else the bundled stdlib-code."""
    return "smollm2" if is_pulled("smollm2") else DEFAULT_MODEL


def model_label(path: str | Path) -> str:
    """A model's short name: its folder's, except that an adapter folder is named by what it adapts
    (`.../smollm2/adapter` is `smollm2`)."""
    path = Path(path).resolve()
    return path.parent.name if path.name == ADAPTER_FOLDER else path.name


def is_model_dir(path: str | Path) -> bool:
    """A model directory holds full weights (config.json) or an adapter over a base (adapter_config.json)."""
    return (Path(path) / "config.json").is_file() or (Path(path) / "adapter_config.json").is_file()


def require_model_dir(path: str | Path) -> Path:
    """`path` as a Path if it is a model directory; DreamError otherwise."""
    if not is_model_dir(path):
        raise DreamError(f"{path} is not a model directory (no config.json or adapter_config.json)")
    return Path(path)


def model_config_file(path: str | Path) -> Path:
    """The config.json describing a model directory: its own, or for an adapter directory its base's."""
    path = require_model_dir(path)
    if (path / "config.json").is_file():
        return path / "config.json"
    from dreamlm.checkpoint import adapter_base  # checkpoint imports the model; hub stays light

    return adapter_base(path) / "config.json"


def model_names() -> dict[str, str]:
    """Every name the resolver knows, with where it is (or how to get it)."""
    names = {n: f"bundled: {assets_dir() / n}" for n in bundled_names()}
    for name, spec in PULLED.items():
        names[name] = f"pulled: {pulled_dir(name)}" if is_pulled(name) else f"not pulled (dreamlm pull {spec.pull})"
    return names


def resolve(model: str | Path | None, default: str = DEFAULT_MODEL) -> Path:
    """The model directory a name or path means (None: `default`); DreamError listing the names if none fits."""
    if model is None or str(model) == "":
        model = default
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if text in PULLED:
        return _pulled_path(text)
    if (assets_dir() / text / "config.json").is_file():
        return assets_dir() / text
    if path.exists():
        raise DreamError(f"{path} is a file, not a model directory")
    if os.sep in text or "/" in text or text.startswith("."):
        raise DreamError(f"model directory {text} does not exist")
    known = ", ".join(bundled_names() + list(PULLED))
    raise DreamError(f"unknown model {text!r}: not a folder and not a model name; names: {known}")
