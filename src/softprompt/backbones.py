"""Backbones: a frozen model, where its embeddings enter, and what a prompt needs to know about it.

A backbone knows nothing about prompts. It embeds token ids, runs the model on embeddings, and describes
itself (hidden size, vocabulary, position limit, a fingerprint of its input-embedding matrix). Methods make
embeddings; joins put them where the backbone takes them (see ``join.py``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cache import BUILTIN_MODELS, builtin_model_dir
from .errors import SoftPromptError

# Fingerprint probe: a fixed grid of entries of the input-embedding matrix. Comparing values with a relative
# tolerance of two bfloat16 roundings makes the same weights match whatever dtype they were loaded in, while
# another model (or the same architecture trained differently) does not.
_PROBE_ROWS, _PROBE_COLS = 16, 16
_PROBE_RTOL = 2.0**-7


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


class Backbone:
    """A frozen model that takes input embeddings. Subclasses say how to run it."""

    kind = "module"

    def __init__(self, model: nn.Module, name: str, tokenizer: Any = None):
        self.model = model
        self.name = name
        self.tokenizer = tokenizer
        freeze(model)
        self._fingerprint: dict | None = None

    # --- description -------------------------------------------------------------------------------
    @property
    def embedding_matrix(self) -> torch.Tensor | None:
        """(V, H) input-embedding weight, or None when the model has no token vocabulary."""
        return None

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def max_positions(self) -> int | None:
        return None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def fingerprint(self) -> dict:
        """Shape and a fixed grid of values of the input-embedding matrix (dtype-tolerant, see matches())."""
        if self._fingerprint is None:
            emb = self.embedding_matrix
            if emb is None:
                self._fingerprint = {"shape": [self.hidden_size], "rows": [], "cols": [], "values": []}
            else:
                V, H = emb.shape
                rows = torch.linspace(0, V - 1, _PROBE_ROWS).round().long().unique().tolist()
                cols = torch.linspace(0, H - 1, _PROBE_COLS).round().long().unique().tolist()
                vals = emb.detach()[rows][:, cols].float().cpu()
                self._fingerprint = {"shape": [V, H], "rows": rows, "cols": cols,
                                     "values": [float(f"{v:.6g}") for v in vals.flatten().tolist()]}
        return self._fingerprint

    def fingerprint_id(self) -> str:
        return fingerprint_id(self.fingerprint())

    # caches derived from the frozen weights, kept on the backbone: prompts' key/values (generation, evaluation)
    # and low-precision copies of the weights made under bf16/fp16 autocast (model._weight_casts)
    CACHES = ("_prompt_kv", "_prompt_states", "_weight_casts")

    def clear_caches(self) -> None:
        """Drop what was computed from the weights and kept for reuse (memory back; later calls recompute it)."""
        for name in self.CACHES:
            self.__dict__.pop(name, None)

    # --- running -----------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise SoftPromptError(f"backbone {self.name!r} has no token embedding; pass inputs_embeds instead of input_ids")

    def forward(self, inputs_embeds: torch.Tensor, **kwargs: Any) -> Any:
        return self.model(inputs_embeds)


def fingerprint_id(fp: dict) -> str:
    """A short, human-readable id of a fingerprint (values rounded so dtype casts do not change it)."""
    coarse = {"shape": fp.get("shape"), "values": [round(v, 2) for v in fp.get("values", [])]}
    return hashlib.sha256(json.dumps(coarse, sort_keys=True).encode()).hexdigest()[:12]


def fingerprints_match(a: dict, b: dict) -> bool:
    if list(a.get("shape", [])) != list(b.get("shape", [])) or a.get("rows") != b.get("rows") or a.get("cols") != b.get("cols"):
        return False
    va, vb = torch.tensor(a.get("values", []), dtype=torch.float64), torch.tensor(b.get("values", []), dtype=torch.float64)
    return va.shape == vb.shape and bool(torch.all((va - vb).abs() <= _PROBE_RTOL * torch.maximum(va.abs(), vb.abs()) + 1e-7))


def freeze(model: nn.Module) -> None:
    """Every backbone weight stays as it was: no gradients, dropout off."""
    model.requires_grad_(False)
    model.eval()


class ModuleBackbone(Backbone):
    """Any PyTorch module that maps embeddings (B, T, H) to outputs (the plain ``nn.Linear`` case)."""

    def __init__(self, model: nn.Module, hidden_size: int, name: str = "module"):
        self._hidden = hidden_size
        super().__init__(model, name=name)

    @property
    def hidden_size(self) -> int:
        return self._hidden


class CausalLMBackbone(Backbone):
    """A Hugging Face causal LM (any ``AutoModelForCausalLM``). Runs on embeddings, takes Cache objects."""

    kind = "causal_lm"

    def __init__(self, model: nn.Module, tokenizer: Any = None, name: str | None = None):
        super().__init__(model, name=name or getattr(model.config, "_name_or_path", "") or model.config.model_type,
                         tokenizer=tokenizer)
        if tokenizer is not None and tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # we pad ourselves; any id works under the mask

    @property
    def config(self):
        return self.model.config

    @property
    def embedding_matrix(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    @property
    def hidden_size(self) -> int:
        return self.embedding_matrix.shape[1]

    @property
    def max_positions(self) -> int | None:
        cfg = self.model.config.get_text_config()
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return None

    @property
    def pad_token_id(self) -> int:
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        cfg = self.model.config
        for key in ("pad_token_id", "eos_token_id"):
            v = getattr(cfg, key, None)
            if isinstance(v, list):
                v = v[0] if v else None
            if v is not None:
                return int(v)
        return 0

    @property
    def eos_token_ids(self) -> list[int]:
        ids: list[int] = []
        for src in (getattr(self.model, "generation_config", None), self.model.config):
            v = getattr(src, "eos_token_id", None) if src is not None else None
            ids += v if isinstance(v, list) else ([v] if v is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(int(i) for i in ids))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, use_cache: bool = False,
                **kwargs: Any) -> Any:
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          cache=cache, use_cache=use_cache, **kwargs)

    def new_cache(self, layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """A transformers Cache object, optionally filled with per-layer (keys, values)."""
        from transformers import DynamicCache

        return DynamicCache(layers, config=self.model.config)


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


def load_backbone(name_or_path: str, dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                  ) -> CausalLMBackbone:
    """Load a frozen causal LM: a built-in name (``smollm2-135m``), a local folder, a ``.gguf`` file, or a hub id.

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
    from .cache import quiet_progress_bars

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
    bb.load_seconds = time.perf_counter() - start
    return bb
