"""Prompt files: one small .safetensors file (tensors + JSON metadata), and PEFT prompt-learning folders.

A file holds a method's collapsed tensors (``Method.tensors()``: "prompt" (P, H) for embedding prompts, "kv"
(L, 2, kv_heads, P, head_dim) for key/value prompts), and metadata: format version, method name and config, shape
facts, the backbone's name and fingerprint, the task, the training summary. ``softprompt.methods.from_file`` turns
one back into a method.

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

from ._version import __version__
from .backbones import fingerprint_id, fingerprints_match
from .errors import SoftPromptError
from .joins import JOINS

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
    def hidden_size(self) -> int | None:
        if "hidden_size" in self.metadata:
            return None if self.metadata["hidden_size"] is None else int(self.metadata["hidden_size"])
        return next(iter(self.tensors.values())).shape[-1] if "prompt" in self.tensors else None

    @property
    def kv_layout(self) -> tuple[int, int, int] | None:
        """(layers, kv_heads, head_dim) of a key/value prompt, else None."""
        kv = self.tensors.get("kv")
        return None if kv is None else (kv.shape[0], kv.shape[2], kv.shape[4])


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
        "prompt_kind": method.prompt_kind,
        "method_config": method.config_dict(),
        **method.describe(),
        "dtype": "float32",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": task,
        "training": training,
    }
    if backbone is not None:
        meta["backbone"] = {"name": backbone.name, "kind": backbone.kind, "fingerprint": backbone.fingerprint(),
                            "fingerprint_id": backbone.fingerprint_id()}
    meta.update(extra or {})
    header = {META_KEY: json.dumps(meta, default=str), "format": "pt"}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header), overwrite)
    return path


def read_prompt(path: str | os.PathLike) -> PromptFile:
    """Read a prompt file without checking it against a backbone."""
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            raise SoftPromptError(f"{path} is a broken symbolic link (to {os.readlink(path)}); point it at a prompt "
                                  "file or replace it with one")
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
    _check_meta(meta, tensors, path)
    return PromptFile(method=meta.get("method", "prompt_tuning"), tensors=tensors, metadata=meta, path=path)


# what each metadata field may be (files come from anywhere: a wrong type is a one-line refusal, never a crash)
_META_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,), "method": (str,), "num_virtual_tokens": (int,), "hidden_size": (int, type(None)),
    "prompt_kind": (str, type(None)), "method_config": (dict, type(None)), "backbone": (dict, type(None)),
    "task": (dict, type(None)), "layers": (int, type(None)), "kv_heads": (int, type(None)),
    "head_dim": (int, type(None)), "dtype": (str, type(None)), "preprocessing": (dict, type(None)),
    "labels": (list, type(None)),
}


def _check_meta(meta: Any, tensors: dict[str, torch.Tensor], path: Path) -> None:
    if not isinstance(meta, dict):
        raise SoftPromptError(f"{path} has corrupt softprompt metadata (a JSON {type(meta).__name__}, not an object)")
    for key, types in _META_TYPES.items():
        if key in meta and (not isinstance(meta[key], types) or isinstance(meta[key], bool) and bool not in types):
            want = " or ".join("null" if t is type(None) else {"dict": "object", "list": "array", "str": "string"}
                               .get(t.__name__, t.__name__) for t in types)
            raise SoftPromptError(f"{path} has corrupt softprompt metadata: {key!r} is {type(meta[key]).__name__}, "
                                  f"not {want}")
    for key in ("format_version", "num_virtual_tokens", "hidden_size", "layers", "kv_heads", "head_dim"):
        if isinstance(meta.get(key), int) and not 0 <= meta[key] < 2**31:
            raise SoftPromptError(f"{path} has corrupt softprompt metadata: {key!r} is {meta[key]}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise SoftPromptError(f"{path} uses prompt format v{meta['format_version']}, newer than this softprompt "
                              f"(v{FORMAT_VERSION}); upgrade softprompt")
    if not tensors:
        raise SoftPromptError(f"{path} holds no tensors; the file is damaged")
    for key, t in tensors.items():
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise SoftPromptError(f"{path}: tensor {key!r} is {str(t.dtype).removeprefix('torch.')}, not float32, "
                                  "float16, bfloat16 or float64; the file is damaged or not a prompt")
        want = {"prompt": 2, "kv": 5}.get(key)
        empty = 0 in t.shape and not (key == "tokens" and t.ndim == 3 and t.shape[1] == 0 and t.shape[0] * t.shape[2])
        if t.ndim == 0 or empty or (want is not None and t.ndim != want):  # VPT with no tokens: a head alone
            raise SoftPromptError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}; the file is damaged")


TEXT_KINDS = ("causal_lm", "encoder", "seq2seq")  # text backbones whose prompts would fit each other's width


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
    trained_on = meta_bb.get("name", "an unknown backbone")
    kind = pf.metadata.get("prompt_kind")
    if kind is not None and (kind, backbone.kind) not in JOINS:
        fits = sorted(b for p, b in JOINS if p == kind)
        raise SoftPromptError(
            f"{where} is a {pf.method} prompt ({kind!r}, trained on {trained_on!r}, a {meta_bb.get('kind', '?')} "
            f"model) and cannot go into backbone {backbone.name!r}, a {backbone.kind!r} model (it goes into: "
            f"{', '.join(fits) or 'none'}); load a backbone of its kind")
    trained_kind = meta_bb.get("kind")
    if trained_kind in TEXT_KINDS and backbone.kind in TEXT_KINDS and trained_kind != backbone.kind:
        raise SoftPromptError(
            f"{where} was trained on {trained_on!r}, a {trained_kind!r} model, but backbone {backbone.name!r} is a "
            f"{backbone.kind!r} model; a prompt only works on the kind of model it was trained on: load that one")
    if pf.hidden_size is not None and pf.hidden_size != backbone.hidden_size:
        raise SoftPromptError(
            f"{where} has width {pf.hidden_size} (trained on {trained_on!r}) but backbone {backbone.name!r} has "
            f"hidden size {backbone.hidden_size}; load the backbone it was trained on")
    if pf.kv_layout is not None and tuple(pf.kv_layout) != tuple(backbone.kv_layout() or ()):
        L, h, d = pf.kv_layout
        theirs = backbone.kv_layout()
        have = "no attention layers" if theirs is None else f"{theirs[0]} layers x {theirs[1]} key/value heads x " \
            f"{theirs[2]} dims"
        raise SoftPromptError(
            f"{where} is a {pf.method} prompt for {L} layers x {h} key/value heads x {d} dims (trained on "
            f"{trained_on!r}) but backbone {backbone.name!r} has {have}; load the backbone it was trained on")
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
# PEFT prompt-learning folders: adapter_config.json + adapter_model.safetensors, one tensor "prompt_embeddings"
# (what PEFT saves for a trained prompt: the encoder's output for P-tuning, the flattened per-layer keys/values for
# prefix tuning). Both ways: PROMPT_TUNING <-> prompt_tuning (residual exports as PROMPT_TUNING: at inference it is
# one), P_TUNING <-> p_tuning, PREFIX_TUNING <-> prefix_tuning / p_tuning_v2. What PEFT's format cannot carry:
# a reparameterisation (P-tuning's encoder, prefix tuning's MLP): folders hold the collapsed prompt, which PEFT
# loads for inference (its default) but cannot train further as the reparameterised method.

PEFT_TYPES = {"prompt_tuning": "PROMPT_TUNING", "residual": "PROMPT_TUNING", "p_tuning": "P_TUNING",
              "prefix_tuning": "PREFIX_TUNING", "p_tuning_v2": "PREFIX_TUNING"}
PEFT_PEFT_VERSION = "0.21.2"  # the format written (and tested against)
# An encoder-decoder's folder says SEQ_2_SEQ_LM with num_transformer_submodules 1: the prompt on the encoder input
# only (Lester et al.), which PEFT then uses alike in forward and generate. PEFT's own default for seq2seq (2) also
# trains a second set on the decoder input, which its generate() does not use: an imported folder keeps the encoder
# set, what PEFT generates with.
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}
PEFT_KINDS = {v: k for k, v in PEFT_TASK_TYPES.items()}


def _peft_config(prompt: PromptFile, backbone: Any, base: str | None) -> dict:
    meta_cfg = prompt.metadata.get("method_config") or {}
    cfg = backbone.model.config.get_text_config() if backbone is not None and hasattr(backbone.model, "config") \
        else None
    peft_type = PEFT_TYPES[prompt.method]
    kind = backbone.kind if backbone is not None else (prompt.metadata.get("backbone") or {}).get("kind")
    config: dict[str, Any] = {
        "auto_mapping": None, "base_model_name_or_path": base, "inference_mode": True, "modules_to_save": None,
        "num_attention_heads": getattr(cfg, "num_attention_heads", None),
        "num_layers": getattr(cfg, "num_hidden_layers", None), "num_transformer_submodules": 1,
        "num_virtual_tokens": prompt.num_virtual_tokens, "peft_type": peft_type, "peft_version": PEFT_PEFT_VERSION,
        "revision": None, "task_type": PEFT_TASK_TYPES.get(kind, "CAUSAL_LM"), "token_dim": prompt.hidden_size,
    }
    if peft_type == "PROMPT_TUNING":
        init = {"text": "TEXT", "vocab": "SAMPLE_VOCAB"}.get(meta_cfg.get("init"), "RANDOM")
        config.update(prompt_tuning_init=init, prompt_tuning_init_text=meta_cfg.get("init_text"),
                      tokenizer_kwargs=None, tokenizer_name_or_path=base if init == "TEXT" else None)
    elif peft_type == "P_TUNING":
        config.update(encoder_reparameterization_type=str(meta_cfg.get("encoder", "mlp")).upper(),
                      encoder_hidden_size=meta_cfg.get("encoder_hidden") or prompt.hidden_size,
                      encoder_num_layers=2, encoder_dropout=0.0)
    else:  # PREFIX_TUNING: PEFT counts key/value heads and their width (its grouped-query convention)
        L, h, d = prompt.kv_layout
        config.update(num_layers=L, num_attention_heads=h, token_dim=h * d, prefix_projection=False,
                      encoder_hidden_size=meta_cfg.get("encoder_hidden") or h * d)
    return dict(sorted(config.items()))


def export_peft(prompt: PromptFile | Any, out_dir: str | os.PathLike, backbone: Any = None, *,
                base_model_name_or_path: str | None = None, overwrite: bool = False) -> Path:
    """Write a PEFT folder that ``PeftModel.from_pretrained(base, out_dir)`` loads (prompt tuning, P-tuning, prefix
    tuning; see PEFT_TYPES)."""
    if not isinstance(prompt, PromptFile):
        prompt = PromptFile(method=prompt.name, tensors=prompt.tensors(),
                            metadata={"method_config": prompt.config_dict(), **prompt.describe()})
    if "head.weight" in prompt.tensors and prompt.method in PEFT_TYPES:
        raise SoftPromptError("this prompt carries a task head (a text encoder's classifier) that PEFT's prompt "
                              "folders cannot hold; keep it as a softprompt file")
    if prompt.method not in PEFT_TYPES:
        raise SoftPromptError(f"PEFT has no folder format for {prompt.method!r} prompts; exportable: "
                              f"{', '.join(PEFT_TYPES)}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SoftPromptError(f"{out} exists and is not empty; choose another folder or pass overwrite (--force)")
    meta_bb = prompt.metadata.get("backbone") or {}
    base = base_model_name_or_path or (backbone.name if backbone is not None else meta_bb.get("name"))
    if "kv" in prompt.tensors:  # (L, 2, h, P, d) -> PEFT's (P, L * 2 * h * d): per token, layer by layer, k then v
        kv = prompt.tensors["kv"].detach().float().cpu()
        weight = kv.permute(3, 0, 1, 2, 4).reshape(kv.shape[3], -1).contiguous()
    else:
        weight = prompt.tensors["prompt"].detach().float().cpu().contiguous()
    config = _peft_config(prompt, backbone, base)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter_model.safetensors",
                 lambda tmp: save_file({"prompt_embeddings": weight}, tmp, metadata={"format": "pt"}), True)
    atomic_write(out / "adapter_config.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"), True)
    return out


def import_peft(folder: str | os.PathLike) -> PromptFile:
    """Read a PEFT PROMPT_TUNING, P_TUNING or PREFIX_TUNING folder (JSON + safetensors only: no code, no pickles)."""
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.exists():
        raise SoftPromptError(f"{folder} has no adapter_config.json; it is not a PEFT adapter folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SoftPromptError(f"{cfg_path} is not valid JSON ({getattr(e, 'msg', 'not UTF-8')})") from None
    if not isinstance(cfg, dict):
        raise SoftPromptError(f"{cfg_path} holds a JSON {type(cfg).__name__}, not an object; it is not a PEFT config")
    peft_type = cfg.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        raise SoftPromptError(f"{folder} holds a {peft_type!r} adapter; softprompt imports PROMPT_TUNING, P_TUNING "
                              "and PREFIX_TUNING")
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
        raise SoftPromptError(f"{weights} has no 'prompt_embeddings' tensor (found: {', '.join(tensors)}); a folder "
                              "saved mid-training holds the encoder, not the prompt: save it with PEFT's "
                              "save_pretrained after training")
    weight = tensors["prompt_embeddings"]
    if not weight.is_floating_point() or weight.ndim != 2 or 0 in weight.shape:
        raise SoftPromptError(f"{weights}: prompt_embeddings is {str(weight.dtype).removeprefix('torch.')} of shape "
                              f"{tuple(weight.shape)}; a prompt is a 2-D floating-point matrix")
    weight = weight.float()

    def number(key: str, default: int | None = None) -> int:
        value = cfg.get(key, default)
        if value is None and default is not None:
            value = default
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
            raise SoftPromptError(f"{cfg_path}: {key!r} is {value!r}, not a positive integer")
        return value

    task_type = str(cfg.get("task_type"))
    subs = number("num_transformer_submodules", 2 if task_type == "SEQ_2_SEQ_LM" else 1)
    if subs > 2 or (subs == 2 and task_type != "SEQ_2_SEQ_LM"):
        raise SoftPromptError(f"{cfg_path}: num_transformer_submodules {subs} with task_type {task_type!r}; expected "
                              "1, or 2 for SEQ_2_SEQ_LM")
    if subs == 2 and peft_type == "PREFIX_TUNING":
        raise SoftPromptError(f"{folder} is a seq2seq prefix-tuning folder (keys/values for the decoder too); "
                              "softprompt imports seq2seq prompt tuning")
    P = number("num_virtual_tokens", weight.shape[0])
    if P > weight.shape[0]:
        raise SoftPromptError(f"{cfg_path}: num_virtual_tokens {P} but prompt_embeddings has {weight.shape[0]} rows")
    weight = weight[:P]
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "num_virtual_tokens": P, "dtype": "float32",
                            "backbone": {"name": str(cfg.get("base_model_name_or_path")),
                                         **({"kind": PEFT_KINDS[task_type]} if task_type in PEFT_KINDS else {})},
                            "imported_from": {"peft": str(folder), "peft_type": peft_type,
                                              "peft_version": str(cfg.get("peft_version")),
                                              "task_type": str(cfg.get("task_type"))}}
    if peft_type == "PREFIX_TUNING":
        L, h = number("num_layers"), number("num_attention_heads")
        d = number("token_dim") // h
        if d == 0 or weight.shape[1] != L * 2 * h * d:
            raise SoftPromptError(f"{weights}: prompt_embeddings of width {weight.shape[1]} is not num_layers x 2 x "
                                  f"token_dim = {L * 2 * h * d}")
        kv = weight.view(P, L, 2, h, d).permute(1, 2, 3, 0, 4).contiguous()  # (L, 2, h, P, d)
        meta.update(method="prefix_tuning", prompt_kind="kv", hidden_size=None, layers=L, kv_heads=h, head_dim=d,
                    method_config={"num_virtual_tokens": P, "reparameterize": False, "layers": L, "kv_heads": h,
                                   "head_dim": d})
        return PromptFile(method="prefix_tuning", tensors={"kv": kv}, metadata=meta, path=folder)
    method = "prompt_tuning" if peft_type == "PROMPT_TUNING" else "p_tuning"
    method_config: dict[str, Any] = {"num_virtual_tokens": P}
    if peft_type == "PROMPT_TUNING":
        init = {"TEXT": "text", "SAMPLE_VOCAB": "vocab"}.get(str(cfg.get("prompt_tuning_init")), "random")
        text = cfg.get("prompt_tuning_init_text")
        method_config.update(init=init, init_text=text if isinstance(text, str) else None)
    else:
        encoder = str(cfg.get("encoder_reparameterization_type", "MLP")).lower()
        method_config.update(encoder=encoder if encoder in ("mlp", "lstm") else "mlp")
    meta.update(method=method, prompt_kind="embeddings", hidden_size=weight.shape[1], method_config=method_config)
    return PromptFile(method=method, tensors={"prompt": weight}, metadata=meta, path=folder)
