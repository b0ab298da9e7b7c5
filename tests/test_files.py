"""Prompt files and PEFT folders: round trips, checks, and every bad file refused with one clear line."""

import json
import os

import pytest
import torch
from conftest import make_backbone
from safetensors import safe_open

import softprompt as sp


@pytest.fixture
def saved(tmp_path, llama):
    prompt = sp.PromptTuning.create(llama, num_virtual_tokens=5, init="text", init_text="great movie")
    path = sp.save_prompt(tmp_path / "p.safetensors", prompt, llama, task={"name": "t"}, training={"steps": 3})
    return prompt, path


def test_round_trip_keeps_tensor_metadata_and_logits(saved, llama):
    prompt, path = saved
    pf = sp.load_prompt(path, backbone=llama)
    assert torch.equal(pf.tensors["prompt"], prompt.weight.detach())
    meta = pf.metadata
    assert meta["format_version"] == 1 and meta["method"] == "prompt_tuning" and meta["dtype"] == "float32"
    assert (meta["num_virtual_tokens"], meta["hidden_size"]) == (5, 32)
    assert meta["backbone"]["name"] == "tiny-llama-0" and meta["task"] == {"name": "t"}
    assert meta["training"] == {"steps": 3} and meta["method_config"]["init_text"] == "great movie"
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(sp.PromptedModel(llama, sp.from_file(pf))(ids).logits,
                               sp.PromptedModel(llama, prompt)(ids).logits, atol=0, rtol=0)
    assert os.path.getsize(path) < 5 * 32 * 4 + 4096  # the floats + a few KB of metadata (fingerprint probe)


def test_file_is_plain_safetensors_with_json_metadata(saved):
    _, path = saved
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["prompt"] and f.metadata()["format"] == "pt"
        assert json.loads(f.metadata()["softprompt"])["method"] == "prompt_tuning"


def test_writes_are_atomic_and_never_overwrite_by_default(saved, llama):
    prompt, path = saved
    before = path.read_bytes()
    with pytest.raises(sp.SoftPromptError, match="already exists"):
        sp.save_prompt(path, prompt, llama)
    assert path.read_bytes() == before
    with torch.no_grad():
        prompt.weight[0, 0] = float("nan")
    with pytest.raises(sp.SoftPromptError, match="NaN"):
        sp.save_prompt(path, prompt, llama, overwrite=True)
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["p.safetensors"]


def test_fingerprint_survives_dtype_casts_but_not_another_model(saved, llama):
    _, path = saved
    bf16 = make_backbone("llama", dtype=torch.bfloat16)
    assert bf16.fingerprint_id() == llama.fingerprint_id()
    sp.load_prompt(path, backbone=bf16)  # same weights in another dtype: accepted
    other = make_backbone("llama", seed=1)
    with pytest.raises(sp.SoftPromptError, match=r"trained on backbone 'tiny-llama-0' .* loaded backbone is 'tiny-llama-1'"):
        sp.load_prompt(path, backbone=other)
    sp.load_prompt(path, backbone=other, check_backbone=False)


def test_hidden_size_mismatch_names_both(saved):
    _, path = saved
    from transformers import AutoModelForCausalLM, LlamaConfig

    wide = sp.CausalLMBackbone(AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)), name="wide")
    with pytest.raises(sp.SoftPromptError, match=r"width 32 \(trained on 'tiny-llama-0'\) but backbone 'wide' has hidden size 48"):
        sp.load_prompt(path, backbone=wide)


def test_corrupt_truncated_and_foreign_files(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(sp.SoftPromptError, match="truncated or corrupt"):
        sp.load_prompt(tmp_path / "trunc.safetensors")
    with pytest.raises(sp.SoftPromptError, match="truncated or corrupt"):
        sp.load_prompt(tmp_path / "junk.safetensors")
    with pytest.raises(sp.SoftPromptError, match="no prompt file"):
        sp.load_prompt(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": torch.zeros(2, 32)}, str(tmp_path / "peftish.safetensors"))
    with pytest.raises(sp.SoftPromptError, match="not a softprompt prompt file"):
        sp.load_prompt(tmp_path / "peftish.safetensors")


def test_nan_in_a_file_is_refused(saved, tmp_path, llama):
    _, path = saved
    pf = sp.load_prompt(path)
    pf.tensors["prompt"][1, 2] = float("inf")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(pf.tensors, str(tmp_path / "inf.safetensors"), metadata=meta)
    with pytest.raises(sp.SoftPromptError, match="1 NaN/Inf values"):
        sp.load_prompt(tmp_path / "inf.safetensors", backbone=llama)


def test_peft_export_loads_in_peft_with_the_same_logits_and_imports_back(saved, tmp_path, llama):
    import peft  # dev dependency: missing, the test fails (CI must not skip interop)
    prompt, path = saved
    out = sp.export_peft(sp.load_prompt(path), tmp_path / "peft")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 5 and cfg["token_dim"] == 32
    assert list(cfg) == sorted(cfg)
    peft_model = peft.PeftModel.from_pretrained(llama.model, str(out))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, 5:]
        ours = sp.PromptedModel(llama, prompt)(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    back = sp.import_peft(out)
    assert torch.equal(back.tensors["prompt"], prompt.weight.detach())
    assert back.metadata["backbone"]["name"] == "tiny-llama-0"
    with pytest.raises(sp.SoftPromptError, match="not empty"):
        sp.export_peft(sp.load_prompt(path), out)


def test_peft_trained_prompt_imports(tmp_path):
    """A folder written by peft itself (not by us) reads back with the same embeddings."""
    import peft  # dev dependency: missing, the test fails (CI must not skip interop)
    bb = make_backbone("qwen2")
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7)
    pm = peft.get_peft_model(bb.model, cfg)
    pm.save_pretrained(tmp_path / "theirs")
    expected = pm.get_prompt_embedding_to_save("default")
    pf = sp.import_peft(tmp_path / "theirs")
    assert torch.equal(pf.tensors["prompt"], expected.float())
    bb2 = make_backbone("qwen2")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        theirs = pm(input_ids=ids).logits[:, 7:]
        ours = sp.PromptedModel(bb2, sp.from_file(pf))(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_import_refuses_other_adapters_and_pickles(tmp_path):
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(sp.SoftPromptError, match="softprompt imports PROMPT_TUNING, P_TUNING and PREFIX_TUNING"):
        sp.import_peft(tmp_path / "lora")
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    (tmp_path / "pt" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(sp.SoftPromptError, match="never loads pickles"):
        sp.import_peft(tmp_path / "pt")
