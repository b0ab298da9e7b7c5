"""The CLI: each subcommand works on a local model folder, --help works, and mistakes print one line."""

import json

import pytest
import torch
from conftest import make_backbone

import softprompt as sp
from softprompt.cli import build_parser, main


@pytest.fixture
def setup(tmp_path):
    bb = make_backbone("llama")
    bb.model.save_pretrained(tmp_path / "model")
    bb.tokenizer.save_pretrained(tmp_path / "model")
    prompt = sp.PromptTuning.create(bb, num_virtual_tokens=4, init="text", init_text="great movie")
    sp.save_prompt(tmp_path / "p.safetensors", prompt, bb)
    return tmp_path, bb, prompt


@pytest.mark.parametrize("cmd", ["generate", "inspect", "export", "import", "demo"])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0 and "usage: softprompt " + cmd in capsys.readouterr().out


def test_generate_matches_the_library(setup, capsys):
    tmp, bb, prompt = setup
    rc = main(["generate", "--model", str(tmp / "model"), "--prompt", str(tmp / "p.safetensors"),
               "--max-new-tokens", "5", "--json", "the movie was", "it is"])
    assert rc == 0
    got = json.loads(capsys.readouterr().out)
    expected = sp.generate(bb, prompt, ["the movie was", "it is"], max_new_tokens=5).texts
    assert [g["output"] for g in got] == expected


def test_inspect_shows_shape_size_metadata_and_nearest_tokens(setup, capsys):
    tmp, bb, prompt = setup
    assert main(["inspect", str(tmp / "p.safetensors"), "--model", str(tmp / "model"), "--nearest", "2"]) == 0
    out = capsys.readouterr().out
    assert "prompt (4, 32) float32" in out and f"({(tmp / 'p.safetensors').stat().st_size:,} bytes)" in out
    assert "tiny-llama-0" in out and "nearest vocabulary tokens" in out
    assert "'great':1.00" in out and "'movie':1.00" in out  # text init: each vector is exactly its word


def test_export_then_import_round_trip(setup, capsys):
    tmp, bb, prompt = setup
    assert main(["export", str(tmp / "p.safetensors"), "--peft", str(tmp / "peft")]) == 0
    assert main(["import", str(tmp / "peft"), str(tmp / "back.safetensors"), "--model", str(tmp / "model")]) == 0
    back = sp.load_prompt(tmp / "back.safetensors", backbone=bb)
    assert torch.equal(back.tensors["prompt"], prompt.weight.detach())


@pytest.mark.parametrize("argv, message", [
    (["inspect", "missing.safetensors"], "no prompt file at missing.safetensors"),
    (["generate", "--model", "no-such-model", "hello"], "not a built-in name"),
    (["export", "missing.safetensors", "--peft", "out"], "no prompt file"),
])
def test_user_mistakes_print_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_an_unexpected_error_prints_one_line_and_the_log_file(setup, capsys, monkeypatch, tmp_path):
    """Not a user mistake (a bug, a broken install): one line naming the error and the file that holds the
    traceback, exit 1; --debug (anywhere on the line) or SOFTPROMPT_DEBUG=1 shows the traceback instead."""
    import softprompt.files

    tmp, _, _ = setup
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))

    def broken(*a, **k):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(softprompt.files, "read_prompt", broken)
    assert main(["inspect", str(tmp / "p.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("softprompt inspect: unexpected error: RuntimeError: something inside broke (full traceback")
    log = err.split("full traceback in ")[1].split(";")[0]
    assert log.startswith(str(tmp_path / "cache" / "logs")) and "RuntimeError" in open(log).read()
    for argv in (["--debug", "inspect", str(tmp / "p.safetensors")], ["inspect", str(tmp / "p.safetensors"), "--debug"]):
        with pytest.raises(RuntimeError, match="something inside broke"):
            main(argv)
    monkeypatch.setenv("SOFTPROMPT_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["inspect", str(tmp / "p.safetensors")])


def test_precision_auto_picks_bf16_only_where_it_is_native(monkeypatch, capsys):
    from softprompt import precision

    assert precision.resolve_precision("auto", "cpu") == ("bf16" if precision.native_bf16("cpu") else "float32")
    assert precision.resolve_precision("float32", "cpu") == "float32"
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": False)
    monkeypatch.setattr(precision, "_warned", set())
    monkeypatch.setattr(precision, "matmul_rates", lambda device="cpu": {"float32": 67.0, "bf16": 0.8})
    assert precision.resolve_precision("auto", "cpu") == "float32"
    assert precision.resolve_precision("bf16", "cpu") == "bf16"  # asked for: kept, with one warning
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0.8 GFLOP/s in bf16 against 67.0 in float32" in err[0]
    with pytest.raises(sp.SoftPromptError, match="precision must be one of"):
        precision.resolve_precision("fp8", "cpu")


def test_import_refuses_to_overwrite(setup, capsys):
    tmp, _, _ = setup
    main(["export", str(tmp / "p.safetensors"), "--peft", str(tmp / "peft")])
    before = (tmp / "p.safetensors").read_bytes()
    assert main(["import", str(tmp / "peft"), str(tmp / "p.safetensors")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp / "p.safetensors").read_bytes() == before


def test_prompt_for_another_backbone_is_refused_by_generate(setup, capsys, tmp_path):
    tmp, _, _ = setup
    other = make_backbone("llama", seed=3)
    other.model.save_pretrained(tmp / "other")
    other.tokenizer.save_pretrained(tmp / "other")
    assert main(["generate", "--model", str(tmp / "other"), "--prompt", str(tmp / "p.safetensors"), "hi"]) == 2
    assert "trained on backbone 'tiny-llama-0'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--vllm-python", "/no/such/python"], "no Python at /no/such/python"),
    (["--vllm-url", "http://127.0.0.1:9"], "no vLLM server answers at http://127.0.0.1:9"),
])
def test_serve_with_the_vllm_engine_and_no_vllm_prints_one_line(setup, extra, message, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = setup[0]
    assert main(["serve", "--model", str(tmp / "model"), "--engine", "vllm", "--port", str(port), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not any("Traceback" in line for line in err)
