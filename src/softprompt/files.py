"""Prompt files: one small .safetensors file (tensors + JSON metadata), and PEFT prompt-tuning folders.

Nothing is ever unpickled: safetensors holds raw tensors, the metadata is JSON. Writes are atomic (temp file
in the same folder, fsync, rename), so a crash never leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .backbones import fingerprint_id, fingerprints_match
from .errors import SoftPromptError
from .methods import get_method

FORMAT_VERSION = 1
META_KEY = "softprompt"


@dataclass
class PromptFile:
    """What a prompt file holds: the method's tensors and the metadata that says what they are for."""

    method: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.metadata.get("num_virtual_tokens", next(iter(self.tensors.values())).shape[0]))

    @property
    def hidden_size(self) -> int:
        return int(self.metadata.get("hidden_size", next(iter(self.tensors.values())).shape[-1]))

    def build(self, device: torch.device | str | None = None):
        """The method module (e.g. PromptTuning), ready to join or to train further."""
        module = get_method(self.method).from_tensors(self.tensors, self.metadata.get("method_config"))
        return module.to(device) if device is not None else module


def atomic_write(path: Path, write: Callable[[str], None], overwrite: bool) -> None:
    """Call write(tmp_path) then rename onto path; refuses to replace an existing file unless overwrite."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SoftPromptError(f"{path} already exists; choose another name or pass overwrite (--force)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_prompt(path: str | os.PathLike, method: Any, backbone: Any = None, *, task: dict | None = None,
                training: dict | None = None, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write a method module (e.g. a trained PromptTuning) with metadata; returns the path."""
    path = Path(path)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in method.tensors().items()}
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise SoftPromptError(f"refusing to save {path}: tensor {k!r} contains NaN/Inf (training diverged?)")
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "softprompt_version": __version__,
        "method": method.name,
        "method_config": method.config_dict(),
        "num_virtual_tokens": method.num_virtual_tokens,
        "hidden_size": method.hidden_size,
        "dtype": "float32",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": task,
        "training": training,
    }
    if backbone is not None:
        meta["backbone"] = {"name": backbone.name, "fingerprint": backbone.fingerprint(),
                            "fingerprint_id": backbone.fingerprint_id()}
    meta.update(extra or {})
    header = {META_KEY: json.dumps(meta, default=str), "format": "pt"}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header), overwrite)
    return path


def read_prompt(path: str | os.PathLike) -> PromptFile:
    """Read a prompt file without checking it against a backbone."""
    path = Path(path)
    if not path.exists():
        raise SoftPromptError(f"no prompt file at {path}")
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            return import_peft(path)
        raise SoftPromptError(f"{path} is a folder; give a .safetensors prompt file (or a PEFT adapter folder)")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise SoftPromptError(f"{path} is not a readable safetensors file (truncated or corrupt: "
                              f"{str(e).splitlines()[0][:100]})") from None
    if META_KEY not in header:
        hint = " (a PEFT adapter? pass its folder)" if "prompt_embeddings" in tensors else ""
        raise SoftPromptError(f"{path} is a safetensors file but not a softprompt prompt file{hint}")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError:
        raise SoftPromptError(f"{path} has corrupt softprompt metadata (not JSON)") from None
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise SoftPromptError(f"{path} uses prompt format v{meta['format_version']}, newer than this softprompt "
                              f"(v{FORMAT_VERSION}); upgrade softprompt")
    return PromptFile(method=meta.get("method", "prompt_tuning"), tensors=tensors, metadata=meta, path=path)


def check_prompt(pf: PromptFile, backbone: Any = None, check_backbone: bool = True) -> None:
    where = pf.path or "prompt"
    for k, v in pf.tensors.items():
        bad = int((~torch.isfinite(v)).sum())
        if bad:
            raise SoftPromptError(f"{where}: tensor {k!r} has {bad} NaN/Inf values; the file is damaged or "
                                  f"training diverged; use an earlier checkpoint")
    meta_bb = pf.metadata.get("backbone") or {}
    if backbone is None:
        return
    if pf.hidden_size != backbone.hidden_size:
        raise SoftPromptError(
            f"{where} has width {pf.hidden_size} (trained on {meta_bb.get('name', 'an unknown backbone')!r}) but "
            f"backbone {backbone.name!r} has hidden size {backbone.hidden_size}; load the backbone it was trained on")
    fp = meta_bb.get("fingerprint")
    if check_backbone and fp and not fingerprints_match(fp, backbone.fingerprint()):
        raise SoftPromptError(
            f"{where} was trained on backbone {meta_bb.get('name')!r} (fingerprint {fingerprint_id(fp)}) but the "
            f"loaded backbone is {backbone.name!r} (fingerprint {backbone.fingerprint_id()}); load the matching "
            f"backbone, or pass check_backbone=False to use it anyway")


def load_prompt(path: str | os.PathLike, backbone: Any = None, check_backbone: bool = True) -> PromptFile:
    """Read a prompt file and check it: finite values, width and (when known) the backbone fingerprint."""
    pf = read_prompt(path)
    check_prompt(pf, backbone, check_backbone)
    return pf


# ---------------------------------------------------------------------------------------------------------
# PEFT prompt-tuning folders: adapter_config.json + adapter_model.safetensors (key "prompt_embeddings")

PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "encoder": "SEQ_CLS", "module": "CAUSAL_LM"}


def export_peft(prompt: PromptFile | Any, out_dir: str | os.PathLike, backbone: Any = None, *,
                base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Write a PEFT PROMPT_TUNING folder that ``PeftModel.from_pretrained(base, out_dir)`` loads."""
    if not isinstance(prompt, PromptFile):
        prompt = PromptFile(method=prompt.name, tensors=prompt.tensors(),
                            metadata={"method_config": prompt.config_dict()})
    if prompt.method != "prompt_tuning":
        raise SoftPromptError(f"PEFT export supports prompt_tuning prompts only (this one is {prompt.method!r})")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SoftPromptError(f"{out} exists and is not empty; choose another folder or pass overwrite (--force)")
    weight = prompt.tensors["prompt"].detach().float().cpu().contiguous()
    P, H = weight.shape
    meta_bb = prompt.metadata.get("backbone") or {}
    base = base_model_name_or_path or (backbone.name if backbone is not None else meta_bb.get("name"))
    cfg = backbone.model.config if backbone is not None and hasattr(backbone.model, "config") else None
    text_cfg = cfg.get_text_config() if cfg is not None else None
    method_cfg = prompt.metadata.get("method_config") or {}
    init_map = {"text": "TEXT", "vocab": "SAMPLE_VOCAB"}
    config = {
        "auto_mapping": None,
        "base_model_name_or_path": base,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": getattr(text_cfg, "num_attention_heads", None),
        "num_layers": getattr(text_cfg, "num_hidden_layers", None),
        "num_transformer_submodules": 1,
        "num_virtual_tokens": P,
        "peft_type": "PROMPT_TUNING",
        "peft_version": "0.21.2",
        "prompt_tuning_init": init_map.get(method_cfg.get("init"), "RANDOM"),
        "prompt_tuning_init_text": method_cfg.get("init_text"),
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": H,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": base if method_cfg.get("init") == "text" else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter_model.safetensors",
                 lambda tmp: save_file({"prompt_embeddings": weight}, tmp, metadata={"format": "pt"}), True)
    atomic_write(out / "adapter_config.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"), True)
    return out


def import_peft(folder: str | os.PathLike) -> PromptFile:
    """Read a PEFT PROMPT_TUNING folder (JSON + safetensors only: no code, no pickles) as a PromptFile."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.exists():
        raise SoftPromptError(f"{folder} has no adapter_config.json; it is not a PEFT adapter folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SoftPromptError(f"{cfg_path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if cfg.get("peft_type") != "PROMPT_TUNING":
        raise SoftPromptError(f"{folder} holds a {cfg.get('peft_type')!r} adapter; only PROMPT_TUNING can be imported")
    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        hint = " (adapter_model.bin is a pickle: softprompt never loads pickles)" if (folder / "adapter_model.bin").exists() else ""
        raise SoftPromptError(f"{folder} has no adapter_model.safetensors{hint}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise SoftPromptError(f"{weights} is not a readable safetensors file ({str(e).splitlines()[0][:100]})") from None
    if "prompt_embeddings" not in tensors:
        raise SoftPromptError(f"{weights} has no 'prompt_embeddings' tensor (found: {', '.join(tensors)})")
    weight = tensors["prompt_embeddings"].float()
    subs = int(cfg.get("num_transformer_submodules") or 1)
    if subs != 1:
        raise SoftPromptError(f"{folder} is a {subs}-submodule (seq2seq) prompt; only causal-LM prompts import so far")
    P = int(cfg.get("num_virtual_tokens") or weight.shape[0])
    weight = weight[:P]
    init = {"TEXT": "text", "SAMPLE_VOCAB": "vocab"}.get(cfg.get("prompt_tuning_init"), "random")
    meta = {
        "format_version": FORMAT_VERSION,
        "method": "prompt_tuning",
        "method_config": {"num_virtual_tokens": P, "init": init, "init_text": cfg.get("prompt_tuning_init_text")},
        "num_virtual_tokens": P,
        "hidden_size": weight.shape[1],
        "dtype": "float32",
        "backbone": {"name": cfg.get("base_model_name_or_path")},
        "imported_from": {"peft": str(folder), "peft_version": cfg.get("peft_version"), "task_type": cfg.get("task_type")},
    }
    return PromptFile(method="prompt_tuning", tensors={"prompt": weight}, metadata=meta, path=folder)
