"""Loading a backbone: a built-in name, a local folder, a .gguf file, or a hub id."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..cache import BUILTIN_MODELS, builtin_model_dir
from ..errors import SoftPromptError
from .base import Backbone
from .causal_lm import CausalLMBackbone
from .encoder import ENCODER_MODEL_TYPES, load_encoder_backbone
from .seq2seq import SEQ2SEQ_MODEL_TYPES, load_seq2seq_backbone
from .vision import VISION_MODEL_TYPES, load_vision_backbone


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise SoftPromptError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SoftPromptError(f"device {device} was asked for but CUDA is not available; use --device cpu")
    return device


def _hub_unreachable() -> str | None:
    """Why the model hub cannot be reached (offline mode, no DNS, no route), or None; answers in ~1 s, where
    transformers itself would retry for a minute."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except Exception:
        endpoint = "https://huggingface.co"
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        return f"{host}: {e.strerror or e}"
    return None


def _model_type(source: Any, kwargs: dict) -> str | None:
    """The config's model_type (a folder's config.json; a hub id's through transformers), None if unknown."""
    import json

    if kwargs.get("gguf_file"):
        return None
    folder = Path(str(source))
    if (folder / "config.json").exists():
        return json.loads((folder / "config.json").read_text()).get("model_type")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source).model_type
    except Exception:  # the causal-LM loader below says what went wrong
        return None


def load_backbone(name_or_path: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                  ) -> Backbone:
    """Load a frozen model: a built-in name (``smollm2-135m``, ``dinov2-small``), a local folder, a ``.gguf`` file, or
    a hub id. Causal LMs, text encoders (BERT family: ``minilm-l6``), encoder-decoders (T5, BART) and ViT-family
    image models (``ViTModel``, ``Dinov2Model``, ``DeiTModel``...).

    dtype defaults to float32 on CPU and bfloat16 on GPUs that support it; device defaults to CUDA when present.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    start = time.perf_counter()
    path = Path(str(name_or_path)).expanduser()
    kwargs: dict[str, Any] = {}
    if name_or_path in BUILTIN_MODELS:
        source = builtin_model_dir(name_or_path)
    elif path.is_file() and path.suffix == ".gguf":
        source, kwargs = path.parent, {"gguf_file": path.name}
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise SoftPromptError(f"{path} is a folder but holds no config.json; point at a model folder or a .gguf file")
        source = path
    elif path.suffix == ".gguf" or str(name_or_path).startswith((".", "/", "~")):
        raise SoftPromptError(f"no model at {path}; check the path")
    else:
        source = str(name_or_path)  # a hub id, for users who can reach a hub
        why = _hub_unreachable()
        if why:
            raise SoftPromptError(
                f"could not load {name_or_path!r}: it is not a built-in name ({', '.join(BUILTIN_MODELS)}), a local "
                f"folder or .gguf file, and the model hub is unreachable ({why}); use a built-in name or a local path")
    from ..cache import quiet_progress_bars

    model_type = _model_type(source, kwargs)
    if model_type == "clip":
        from .clip import load_clip_backbone

        bb = load_clip_backbone(source, str(name_or_path), dt, dev)
        bb.load_seconds = time.perf_counter() - start
        return bb
    loaders = {**dict.fromkeys(VISION_MODEL_TYPES, load_vision_backbone),
               **dict.fromkeys(ENCODER_MODEL_TYPES, load_encoder_backbone),
               **dict.fromkeys(SEQ2SEQ_MODEL_TYPES, load_seq2seq_backbone)}
    loader = loaders.get(model_type)
    if loader is not None:
        bb = loader(source, str(name_or_path), dt, dev)
        bb.load_seconds = time.perf_counter() - start
        return bb
    try:
        with quiet_progress_bars():  # a 1-second load needs no bar; our own messages say what happens
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, **kwargs)
            try:
                tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            except (OSError, ValueError):
                tokenizer = None
    except OSError as e:
        if isinstance(source, str):
            known = ", ".join(BUILTIN_MODELS)
            raise SoftPromptError(
                f"could not load {name_or_path!r}: it is not a built-in name ({known}), a local folder or .gguf file, "
                f"and the model hub did not answer ({str(e).splitlines()[0][:120]})"
            ) from None
        raise SoftPromptError(f"could not load a model from {source}: {str(e).splitlines()[0]}") from None
    if kwargs.get("gguf_file"):
        model.hf_quantizer = None  # weights are de-quantised floats now
    model.to(dev)
    bb = CausalLMBackbone(model, tokenizer, name=str(name_or_path))
    bb.source, bb.gguf_file = str(source), kwargs.get("gguf_file")  # what another engine (vLLM) would load
    bb.load_seconds = time.perf_counter() - start
    return bb
