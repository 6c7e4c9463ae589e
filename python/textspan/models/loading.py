"""Loading models: open_clip names (and `hf-hub:` names), config files and checkpoints, Hugging
Face `transformers` CLIP-like models (`hf:` hub ids or `save_pretrained` folders), and models
registered by name (the package registers its embedded toy CLIPs this way)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, MissingFileError
from .hf import is_transformers_name, load_transformers

__all__ = ["default_device", "load", "register_model", "resolve_model_name", "skeleton"]


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16")

# Loaders of models known by a name of their own: name -> loader(pretrained, device).
_NAMED: dict[str, Callable[[Any, str], Any]] = {}
# Packages name their models under this entry-point group (textspan's own toy CLIPs are
# declared in pyproject.toml), so this tier never imports the tiers that define them.
ENTRY_POINTS = "textspan.models"


def register_model(name: str, loader: Callable[[Any, str], Any]) -> None:
    """Makes `load(name, pretrained, device)` call `loader(pretrained, device)`, which returns
    (model, preprocess, tokenizer): for models that are not open_clip names. Installed
    packages can declare theirs as entry points of the group `textspan.models` instead."""
    _NAMED[name] = loader


def _named_loader(name: str) -> Callable[[Any, str], Any] | None:
    if name in _NAMED:
        return _NAMED[name]
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINTS):
        if entry.name == name:
            _NAMED[name] = entry.load()
            return _NAMED[name]
    return None


def _recognised(name: str | os.PathLike) -> tuple[str, Any]:
    """What a model name names, decided in this one place: ("named", its loader),
    ("transformers", the name) or ("open_clip", the open_clip name, checked)."""
    named = _named_loader(str(name)) if not str(name).endswith(".json") else None
    if named is not None:
        return "named", named
    if is_transformers_name(name):
        return "transformers", name
    return "open_clip", _checked_open_clip_name(name)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_model_name(name: str | os.PathLike) -> str:
    """An open_clip model name; a path to a model config JSON is registered first and its
    file name (without .json) becomes the name."""
    path = Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise MissingFileError(f"model config: no such file {path}")
        _check_config(path)
        import open_clip

        open_clip.add_model_config(path)
        return path.stem
    return str(name)


# The widths and depths of a model config that must be positive integers, by tower.
_CONFIG_SIZES = {
    "vision_cfg": ("layers", "width", "patch_size", "image_size"),
    "text_cfg": ("layers", "width", "context_length", "vocab_size"),
}


def _check_config(path: Path) -> None:
    """A model config JSON checked before anything is built from it: readable, its sizes
    positive integers, and the weights they imply (about 12·W² per layer, in float32) within
    this machine's memory, so that a typo is one line rather than a long allocation."""
    import json

    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"model config {path}: not JSON ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("vision_cfg"), dict):
        raise InputError(f"model config {path}: expected an object with a 'vision_cfg' object")
    weights = 0
    for tower, keys in _CONFIG_SIZES.items():
        cfg = config.get(tower) or {}
        for key in keys:
            value = cfg.get(key)
            if key in cfg and not (isinstance(value, int) and not isinstance(value, bool)):
                value = None
            if key in cfg and (value is None or value < 1):
                raise InputError(
                    f"model config {path}: {tower}.{key}: expected a positive integer, got "
                    f"{cfg.get(key)!r}"
                )
        if isinstance(cfg.get("layers"), int) and isinstance(cfg.get("width"), int):
            weights += 12 * cfg["layers"] * cfg["width"] ** 2
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * weights > memory:
        raise InputError(
            f"model config {path}: its layers and widths make about {weights / 1e9:.1f} billion "
            f"weights ({4 * weights / 2**30:.0f} GiB in float32), more than this machine's "
            f"{memory / 2**30:.0f} GiB of memory"
        )


def load(
    name: str | os.PathLike,
    pretrained: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor], Callable[..., torch.Tensor]]:
    """A model in eval mode, its image preprocessing and its tokenizer.

    Args:
        name: an open_clip model name (`open_clip.list_models()`; `textspan models` lists
            which decompose), an open_clip `hf-hub:` name, a path to a model config JSON of
            your own, a Hugging Face `transformers` CLIP, SigLIP or MetaCLIP 2 model ("hf:" and
            a hub id such as "hf:openai/clip-vit-base-patch16", or a folder written by
            `save_pretrained`), or a registered name: "toy", the embedded toy CLIP
            (`textspan.toy`; `pretrained` may then name a folder written by `textspan
            toy-train`), or "toy-spurious", the toy CLIP trained to lean on the background.
        pretrained: an open_clip pretrained tag (downloaded from the hub, e.g. "openai" or
            "laion2b_s34b_b79k"), a path to a local checkpoint, or None for random weights
            (seeded: the same in every process). Unused for Hugging Face models.
        device: "cuda" when available, else "cpu", unless given.
        precision: "fp32", "fp16", "bf16", "pure_fp16" or "pure_bf16" (open_clip's names).

    Returns:
        (model, preprocess, tokenizer).
    """
    import open_clip

    if precision not in PRECISIONS:
        raise InputError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = _checked_device(device)
    kind, model_name = _recognised(name)
    if kind == "named":
        return model_name(pretrained, device)
    if kind == "transformers":
        return load_transformers(model_name, device, precision)
    if pretrained is not None:
        path = Path(pretrained)
        looks_like_a_file = os.sep in str(pretrained) or path.suffix in CHECKPOINT_SUFFIXES
        if looks_like_a_file and not path.is_file():
            raise MissingFileError(f"pretrained: no such checkpoint file {pretrained}")
    # Random weights are drawn from a fixed seed (the caller's RNG left as it was), so every
    # process that loads the same name gets the same model: a store extracted by many
    # workers stays one model's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=None if pretrained is None else str(pretrained),
                device=device,
                precision=precision,
            )
        except Exception as e:  # torch and open_clip raise many kinds
            if pretrained is not None and Path(str(pretrained)).is_file():
                raise InputError(
                    f"pretrained: {pretrained} could not be loaded as a checkpoint of "
                    f"{model_name}: {type(e).__name__}: {str(e)[:300]}"
                ) from None
            if pretrained is None or not isinstance(e, RuntimeError | OSError | ValueError):
                raise
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise InputError(
                f"pretrained: {str(pretrained)!r} could not be loaded for {model_name} ({e}). "
                f"open_clip's tags for it: {', '.join(tags) or 'none'}; without a network, pass "
                "the path of a checkpoint file instead"
            ) from None
    model.eval()
    return model, preprocess, _tokenizer(model_name)


def _checked_open_clip_name(name: str | os.PathLike) -> str:
    import open_clip

    model_name = resolve_model_name(name)
    if model_name.startswith("hf-hub:") or model_name in open_clip.list_models():
        return model_name
    raise InputError(
        f"model: expected an open_clip model name, an hf-hub: name, a config .json or an "
        f"hf: Hugging Face model, got {str(name)!r} (`textspan models` lists open_clip's)"
    )


def _tokenizer(model_name: str) -> Callable[..., torch.Tensor]:
    """open_clip's tokenizer; some come over the network (SigLIP's and hf-hub models' from
    the Hugging Face hub, a SigLIP-named model's without one from a sentencepiece URL), so
    offline that is one clear error, not the fetcher's traceback."""
    import open_clip

    try:
        return open_clip.get_tokenizer(model_name)
    except (OSError, ValueError, ImportError) as e:
        config = open_clip.get_model_config(model_name) or {}
        hub = config.get("text_cfg", {}).get("hf_tokenizer_name")
        first = str(e).strip().splitlines()[0]
        if hub:
            where = f"the Hugging Face hub ({hub})"
            supply = (
                "Run once with a network so that it is cached (under HF_HOME), or point "
                "HF_HOME at a cache that holds it"
            )
        else:
            where = "a URL (open_clip's SigLIP sentencepiece vocabulary, for a name with 'siglip')"
            supply = (
                "Run with a network (fsspec then needs requests and aiohttp), or set the "
                "config's text_cfg.hf_tokenizer_name to a local tokenizer folder"
            )
        raise MissingFileError(
            f"tokenizer of {model_name}: open_clip reads it from {where}, which could not be "
            f"reached ({first}). {supply}"
        ) from None


def _checked_device(device: str | torch.device | None) -> str:
    """The device to load on: the one given, or CUDA when there is one, else the CPU."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(
            f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r} ({e})"
        ) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device: {device!r} asked for, but PyTorch sees no CUDA device here")
    return str(device)


def skeleton(name: str | os.PathLike, pretrained: Any = None) -> torch.nn.Module:
    """A model of that architecture on the meta device: its shapes, without any weights. A
    model known by a name of its own is loaded on the CPU instead."""
    import open_clip

    kind, model_name = _recognised(name)
    if kind == "named":
        return model_name(pretrained, "cpu")[0]
    if kind == "transformers":
        return load_transformers(model_name, "cpu", "fp32")[0]
    with torch.device("meta"):
        return open_clip.create_model(model_name, device="meta")
