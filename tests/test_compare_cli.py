"""compare / eval / train through the CLI on a tiny model folder and local JSONL files."""

import json
import math

import pytest
from conftest import SYNTH_TASK, synthetic_splits, write_model_and_data

from softprompt.cli import main
from softprompt.compare import compare, few_shot_prefix, markdown_table
from softprompt.tasks.spec import TaskSpec
from softprompt.train.config import load_config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    task = write_model_and_data(tmp, 256)
    (tmp / "run.yaml").write_text(json.dumps({
        "model": str(tmp / "model"), "task": task, "out_dir": str(tmp / "run"),
        "method": {"num_virtual_tokens": 8, "init": "random"},
        "train": {"steps": 120, "batch_size": 16, "lr": 0.1, "eval_every": 40, "precision": "float32"}}))
    return tmp


def test_train_then_eval_through_the_cli(folder, capsys):
    assert main(["train", str(folder / "run.yaml")]) == 0
    out = capsys.readouterr().out
    assert "saved" in out and "trainable 512 of" in out and "bytes per task" in out
    assert main(["train", str(folder / "run.yaml")]) == 2  # the folder holds a run now
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert main(["eval", str(folder / "run" / "prompt.safetensors"), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["accuracy"] >= 0.9 and m["n"] == 128 and len(m["confusion"]["matrix"]) == 2
    assert main(["eval", str(folder / "run" / "prompt.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "confusion (rows: gold, columns: predicted)" in text


def test_unknown_key_through_the_cli(folder, capsys):
    assert main(["train", str(folder / "run.yaml"), "--train.lrr", "0.1"]) == 2
    assert "did you mean train.lr?" in capsys.readouterr().err


def test_compare_gives_one_table_with_costs(folder, tmp_path):
    cfg = load_config(str(folder / "run.yaml"), ["--out_dir", str(tmp_path / "cmp"), "--train.steps", "100",
                                                 "--train.finetune_lr", "1e-3"])
    result = compare(cfg, k_shot=2, out=str(tmp_path / "cmp"), say=lambda *a: None, search_steps=0)
    rows = {r["method"].split(" (")[0]: r for r in result["rows"]}
    assert set(rows) == {"zero-shot", "few-shot", "prompt tuning", "full fine-tuning"}
    assert rows["prompt tuning"]["accuracy"] >= 0.9 > rows["zero-shot"]["accuracy"]
    assert rows["prompt tuning"]["trainable_params"] == 8 * 64 and rows["zero-shot"]["trainable_params"] == 0
    ft = rows["full fine-tuning"]
    assert ft["trainable_params"] > 50_000 and ft["bytes_per_task"] == ft["trainable_params"] * 4
    assert ft["accuracy"] >= 0.8 and ft["train_seconds"] > 0 and ft["peak_rss_mb"] > 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table == markdown_table(result) + "\n" and table.count("\n|") == 6  # header, rule, 4 rows
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"][0]["confusion"]["labels"]


def test_few_shot_prefix_is_balanced_and_seeded():
    task = TaskSpec(**SYNTH_TASK)
    from conftest import make_tokenizer

    tok = make_tokenizer()
    rows = synthetic_splits()["train"]
    a = few_shot_prefix(task, tok, rows, 4, seed=1)
    assert a == few_shot_prefix(task, tok, rows, 4, seed=1) and a != few_shot_prefix(task, tok, rows, 4, seed=2)
    assert a.count("sentiment : yes") == 2 and a.count("sentiment : no") == 2


def test_eval_with_baselines_prints_one_table(folder, capsys, tmp_path):
    if not (folder / "run" / "prompt.safetensors").exists():
        assert main(["train", str(folder / "run.yaml")]) == 0
    assert main(["eval", str(folder / "run" / "prompt.safetensors"), "--baselines", "--k-shot", "2",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| zero-shot (template only) |" in out and "| few-shot (2 examples in context) |" in out
    assert "| prompt tuning (8 tokens) |" in out and (tmp_path / "compare.json").exists()


def test_json_flags_print_one_json_document_and_nothing_else(folder, capsys):
    """--json: stdout is one JSON document (progress goes to stderr), for scripts to read."""
    if not (folder / "run" / "prompt.safetensors").exists():
        assert main(["train", str(folder / "run.yaml")]) == 0
    capsys.readouterr()
    prompt = str(folder / "run" / "prompt.safetensors")
    assert main(["eval", prompt, "--baselines", "--k-shot", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)  # the whole of stdout parses
    assert [r["method"].split(" (")[0] for r in got["rows"]] == ["zero-shot", "few-shot", "prompt tuning"]
    assert main(["eval", prompt, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 128


def test_training_progress_lines_without_a_terminal(folder, tmp_path, capsys):
    """Piped or logged (no terminal, so no bar), training still says how far it is: a line every log_every steps
    with step, loss and ETA, on stderr."""
    assert main(["train", str(folder / "run.yaml"), "--out_dir", str(tmp_path / "run"), "--train.steps", "12",
                 "--train.log_every", "4", "--train.eval_every", "12"]) == 0
    err = capsys.readouterr().err.splitlines()
    steps = [line for line in err if line.startswith("train step ")]
    assert [s.split(":")[0] for s in steps] == ["train step 4/12", "train step 8/12", "train step 12/12"]
    assert all("loss " in s and "ETA " in s and "s/step" in s for s in steps)
    assert any(line.startswith("validation at step 12: ") for line in err)


def test_compare_every_row_with_lr_chosen_on_validation(folder, tmp_path):
    """All rows in one table: each trained row keeps its best validation step and records the lr grid, every
    candidate's validation score and the choice; costs per row; the notes name the best prompt method against the
    linear probe and full fine-tuning."""
    cfg = load_config(str(folder / "run.yaml"), ["--out_dir", str(tmp_path / "all"), "--train.steps", "48",
                                                 "--train.eval_every", "24", "--train.eval_examples", "64"])
    rows = ("zero_shot", "linear_probe", "prompt_tuning", "residual", "p_tuning", "prefix_tuning", "p_tuning_v2",
            "lora", "fine_tune")
    grids = {"prompt_tuning": (1e-4, 0.1), "residual": (1e-4, 0.1), "p_tuning": (1e-3, 1e-2),
             "prefix_tuning": (1e-3, 1e-2), "p_tuning_v2": (1e-2, 0.1), "lora": (1e-3, 1e-2), "fine_tune": (1e-4, 1e-3)}
    result = compare(cfg, baselines=rows, out=str(tmp_path / "all"), say=lambda *a: None, search_steps=6,
                     lr_grids=grids)
    by = {r["key"]: r for r in result["rows"]}
    assert list(by) == list(rows)
    for key in grids:
        r = by[key]
        assert r["lr_grid"] == list(grids[key]) and set(r["lr_validation"]) == {f"{x:g}" for x in grids[key]}
        assert r["lr"] == max(grids[key], key=lambda x: r["lr_validation"][f"{x:g}"])
        assert r["train_seconds"] > 0 and r["trainable_params"] > 0 and r["bytes_per_task"] > 0
    # zero-shot is at 40% on this task: 48 steps of prompt tuning reach ~80%
    assert by["prompt_tuning"]["accuracy"] > 0.7 > by["zero_shot"]["accuracy"] and by["linear_probe"]["accuracy"] > 0.6
    assert by["linear_probe"]["train_rows"] == min(256, 48 * 16) and by["linear_probe"]["bytes_per_task"] < 2000
    assert by["prefix_tuning"]["bytes_per_task"] > by["prompt_tuning"]["bytes_per_task"]  # keys/values per layer
    assert by["fine_tune"]["shares_batch"].startswith("no") and by["prompt_tuning"]["shares_batch"] == "yes"
    assert any("linear probe" in n for n in result["notes"]) and any("full fine-tuning" in n for n in result["notes"])
    assert set(by["prompt_tuning"]["recall"]) == {"positive", "negative"}
    table = (tmp_path / "all" / "compare.md").read_text()
    assert "| LoRA (r 8, q/v projections) |" in table and "| prefix tuning (8 tokens per layer) |" in table


def test_a_stopped_compare_resumes_keeping_its_finished_rows(folder, tmp_path, monkeypatch, capsys):
    """The table is rewritten after every row: a comparison killed in its third row resumes with the two finished
    rows kept as they were (not re-run) and only the rest trained; other settings refuse to resume in one line."""
    import softprompt.compare as cmp

    out = tmp_path / "stopped"
    args = ["compare", str(folder / "run.yaml"), "--baselines", "zero_shot,linear_probe,prompt_tuning", "--out",
            str(out), "--search-steps", "0", "--train.steps", "24", "--out_dir", str(out / "runs")]

    def killed(self, key):
        raise KeyboardInterrupt  # Ctrl-C (or a kill) here: nothing after this row runs

    monkeypatch.setattr(cmp._Compare, "prompt_method", killed)
    assert main(args) == 130
    partial = json.loads((out / "compare.json").read_text())
    assert [r["key"] for r in partial["rows"]] == ["zero_shot", "linear_probe"] and partial["complete"] is False
    assert not (out / "compare.md").exists()
    monkeypatch.undo()

    ran = []
    real_probe = cmp._Compare.linear_probe
    monkeypatch.setattr(cmp._Compare, "linear_probe", lambda self: ran.append("linear_probe") or real_probe(self))
    assert main([*args, "--resume", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert ran == [] and result["complete"] is True
    assert [r["key"] for r in result["rows"]] == ["zero_shot", "linear_probe", "prompt_tuning"]
    assert result["rows"][:2] == partial["rows"] and result["rows"][2]["accuracy"] > 0.5
    assert (out / "compare.md").exists()

    assert main([*args[:-2], "--train.steps", "48", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "settings differ (steps 24 -> 48)" in err[0] and "--overwrite" in err[0]


def test_a_learning_rate_at_the_edge_of_the_grid_gets_one_step_beyond(tmp_path):
    """The winner at the top (or bottom) of a grid of three is tried once more a grid step beyond; a winner inside
    the grid, or a grid of two, is taken as it is. Every trial is recorded."""
    from types import SimpleNamespace

    from softprompt.compare import _Compare

    def run(grid, best_at):
        tried = []

        def train(lr, steps, sub):
            tried.append(lr)
            return SimpleNamespace(best={"macro_f1": -abs(math.log(lr / best_at))})

        cmp = _Compare.__new__(_Compare)
        cmp.lr_grids, cmp.search_steps, cmp.say = {"prompt_tuning": grid}, 3, lambda *a: None
        lr, info = cmp.choose_lr("prompt_tuning", train)
        return lr, tried, info

    lr, tried, info = run((3e-3, 1e-2, 3e-2), best_at=0.2)
    assert tried == [3e-3, 1e-2, 3e-2, 0.09] and lr == 0.09 and info["lr_grid"] == [3e-3, 1e-2, 3e-2, 0.09]
    assert set(info["lr_validation"]) == {"0.003", "0.01", "0.03", "0.09"}
    lr, tried, _ = run((3e-3, 1e-2, 3e-2), best_at=1e-4)
    assert tried == [3e-3, 1e-2, 3e-2, 0.0009] and lr == 0.0009
    assert run((3e-3, 1e-2, 3e-2), best_at=1e-2)[1] == [3e-3, 1e-2, 3e-2]  # inside: no extra trial
    assert run((1e-3, 1e-2), best_at=1.0)[1] == [1e-3, 1e-2]  # a grid of two: no extra trial
