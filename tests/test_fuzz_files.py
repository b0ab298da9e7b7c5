"""Fuzzed prompt files and PEFT folders (hypothesis): truncated, bit-flipped, wrong dtypes and shapes, huge headers,
NaN/Inf, metadata of the wrong types, symlinks, pickles named .safetensors. Every one loads cleanly or is refused
with a one-line SoftPromptError; nothing else escapes, and nothing is written."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from conftest import make_backbone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import softprompt as sp
from softprompt.errors import SoftPromptError
from softprompt.methods import from_file
from softprompt.serve import PromptBank

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

BB = make_backbone("llama")


def _valid_files(tmp):
    """Bytes of real prompt files of each kind (embeddings, per-layer key/values, reparameterised, with a task)."""
    files = {}
    for name, method in {"pt": sp.PromptTuning.create(BB, num_virtual_tokens=3),
                         "prefix": sp.PrefixTuning.create(BB, num_virtual_tokens=2),
                         "ptuning": sp.get_method("p_tuning").create(BB, num_virtual_tokens=2)}.items():
        path = tmp / f"{name}.safetensors"
        sp.save_prompt(path, method, BB)
        files[name] = path.read_bytes()
    return files


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return _valid_files(tmp_path_factory.mktemp("valid"))


def _header(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _pack(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def load_everywhere(path) -> str | None:
    """Read, check against the backbone, build the method, add to a bank: as the CLI and the server do. Returns
    None when it loaded, else the one-line refusal. Any other exception fails the test."""
    folder_before = sorted(os.listdir(path.parent))
    try:
        pf = sp.load_prompt(path, BB)
        method = from_file(pf, BB.device)
        method.check_backbone(BB)
        with torch.no_grad():
            method()
        PromptBank(BB).add("fuzzed", path)
        return None
    except SoftPromptError as e:
        message = str(e)
        assert message and "\n" not in message, message
        return message
    finally:
        assert sorted(os.listdir(path.parent)) == folder_before  # nothing written beside it


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) |
                       st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                  max_size=3), max_leaves=6)


@FUZZ
@given(kind=st.sampled_from(["pt", "prefix", "ptuning"]), cut=st.integers(0, 10**6))
def test_truncated_files_are_refused(valid, tmp_path_factory, kind, cut):
    data = valid[kind]
    path = tmp_path_factory.mktemp("t") / "p.safetensors"
    path.write_bytes(data[: cut % len(data)])
    assert load_everywhere(path) is not None


@FUZZ
@given(kind=st.sampled_from(["pt", "prefix", "ptuning"]), flips=st.lists(st.integers(0, 10**7), min_size=1,
                                                                             max_size=8))
def test_bit_flips_load_cleanly_or_are_refused(valid, tmp_path_factory, kind, flips):
    data = bytearray(valid[kind])
    for f in flips:
        data[(f // 8) % len(data)] ^= 1 << (f % 8)
    path = tmp_path_factory.mktemp("f") / "p.safetensors"
    path.write_bytes(bytes(data))
    load_everywhere(path)


@FUZZ
@given(kind=st.sampled_from(["pt", "prefix", "ptuning"]), key=st.sampled_from(
    ["method", "format_version", "num_virtual_tokens", "hidden_size", "prompt_kind", "method_config", "backbone",
     "task", "layers", "kv_heads", "head_dim", "dtype"]), value=JSONISH)
def test_metadata_of_the_wrong_type_is_refused_in_one_line(valid, tmp_path_factory, kind, key, value):
    header, body = _header(valid[kind])
    meta = json.loads(header["__metadata__"]["softprompt"])
    meta[key] = value
    header["__metadata__"]["softprompt"] = json.dumps(meta)
    path = tmp_path_factory.mktemp("m") / "p.safetensors"
    path.write_bytes(_pack(header, body))
    load_everywhere(path)


@FUZZ
@given(kind=st.sampled_from(["pt", "prefix", "ptuning"]), meta=JSONISH)
def test_metadata_that_is_not_an_object_is_refused(valid, tmp_path_factory, kind, meta):
    header, body = _header(valid[kind])
    header["__metadata__"]["softprompt"] = json.dumps(meta)
    path = tmp_path_factory.mktemp("o") / "p.safetensors"
    path.write_bytes(_pack(header, body))
    load_everywhere(path)


@FUZZ
@given(kind=st.sampled_from(["pt", "prefix", "ptuning"]),
       dtype=st.sampled_from(["F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "XX"]),
       shape=st.lists(st.integers(0, 9), max_size=6), fill=st.sampled_from([0.0, float("nan"), float("inf"), 1e39]))
def test_wrong_dtypes_shapes_and_values_are_refused(valid, tmp_path_factory, kind, dtype, shape, fill):
    header, _ = _header(valid[kind])
    name = next(k for k in header if k != "__metadata__")
    sizes = {"F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "XX": 4}
    n = 1
    for s in shape:
        n *= s
    others = {k: v for k, v in header.items() if k in ("__metadata__",)}
    body = b""
    if dtype in ("F16", "F64"):
        body = torch.full((n,), fill, dtype=torch.float64).to(torch.float16 if dtype == "F16" else torch.float64)
        body = body.numpy().tobytes()
    else:
        body = bytes(n * sizes[dtype])
    header = {**others, name: {"dtype": dtype, "shape": shape, "data_offsets": [0, len(body)]}}
    path = tmp_path_factory.mktemp("d") / "p.safetensors"
    path.write_bytes(_pack(header, body))
    load_everywhere(path)


def test_huge_headers_pickles_symlinks_and_folders_are_refused(valid, tmp_path):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    assert "not a readable safetensors" in load_everywhere(huge)
    big = tmp_path / "big.safetensors"  # a header that is valid JSON but enormous
    big.write_bytes(_pack({"__metadata__": {"x": "y" * 5_000_000}}, b""))
    load_everywhere(big)
    pickle = tmp_path / "pickle.safetensors"
    torch.save({"prompt": torch.zeros(3, 32)}, pickle)
    assert "not a readable safetensors" in load_everywhere(pickle)
    real = tmp_path / "real.safetensors"
    real.write_bytes(valid["pt"])
    dangling = tmp_path / "dangling.safetensors"
    dangling.symlink_to(tmp_path / "gone.safetensors")
    assert "broken symbolic link" in load_everywhere(dangling)
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    assert load_everywhere(loop) is not None
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert load_everywhere(empty) is not None
    # a served folder refuses links (a link could point anywhere on the machine); other files still load
    served = tmp_path / "served"
    served.mkdir()
    (served / "good.safetensors").write_bytes(valid["pt"])
    (served / "link.safetensors").symlink_to(real)
    bank = PromptBank(BB, served)
    assert bank.names() == ["good"] and "symbolic link" in bank.refused["link.safetensors"]


@FUZZ
@given(key=st.sampled_from(["peft_type", "num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim",
                            "num_transformer_submodules", "encoder_reparameterization_type", "prompt_tuning_init",
                            "base_model_name_or_path", "task_type"]), value=JSONISH,
       kind=st.sampled_from(["pt", "prefix", "ptuning"]))
def test_fuzzed_peft_folders_are_refused_in_one_line(valid, tmp_path_factory, key, value, kind):
    tmp = tmp_path_factory.mktemp("peft")
    src = tmp / "p.safetensors"
    src.write_bytes(valid[kind])
    folder = tmp / "peft"
    sp.export_peft(sp.load_prompt(src), folder, BB)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg[key] = value
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    try:
        pf = sp.load_prompt(folder, BB)
        from_file(pf, BB.device)
    except SoftPromptError as e:
        assert "\n" not in str(e)


@FUZZ
@given(config=JSONISH)
def test_peft_configs_that_are_not_objects_are_refused(valid, tmp_path_factory, config):
    folder = tmp_path_factory.mktemp("peftcfg")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(SoftPromptError):
        sp.load_prompt(folder, BB)
