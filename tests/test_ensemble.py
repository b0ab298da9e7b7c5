"""Prompt ensembles: members scored in one mixed forward equal each member alone; mean and vote combination; the
eval command's ensemble table; refusals."""

import json

import pytest
import torch
from conftest import SYNTH_TASK, make_backbone, synthetic_splits, write_model_and_data

from softprompt import SoftPromptError
from softprompt.cli import main
from softprompt.ensemble import Ensemble, evaluate_ensemble
from softprompt.methods import DeepPrompt, PromptTuning
from softprompt.model import PromptedModel
from softprompt.tasks.spec import TaskSpec, task_encoder


def test_members_in_one_mixed_forward_score_as_each_prompt_alone():
    bb = make_backbone("llama")
    members = [PromptTuning.create(bb, num_virtual_tokens=4, init="random", seed=1),
               PromptTuning.create(bb, num_virtual_tokens=6, init="random", seed=2),
               DeepPrompt.create(bb, num_virtual_tokens=3, init="random", seed=3)]
    ens = Ensemble(bb, members)
    assert ens.mixed
    enc = task_encoder(TaskSpec(**SYNTH_TASK), bb, 6)
    batch = next(enc.eval_batches(synthetic_splits()["test"][:8], 8))[1]
    with torch.no_grad():
        got = ens.member_scores(enc, batch)  # (3, 8, 2)
        for j, m in enumerate(members):
            alone = enc.label_scores(PromptedModel(bb, m), batch).log_softmax(-1)
            assert torch.allclose(got[j], alone, atol=1e-5), j


def test_mean_and_vote_combine_members():
    ens = Ensemble(make_backbone("llama"), [PromptTuning(torch.zeros(1, 32)), PromptTuning(torch.zeros(1, 32))])
    p = torch.tensor([[[0.9, 0.1]], [[0.4, 0.6]], [[0.45, 0.55]]])  # 3 members, 1 row, 2 labels
    ens.combine = "mean"
    assert ens.combined(p.log()).argmax(-1).item() == 0  # mean probability 0.583 for label 0
    ens.combine = "vote"
    assert ens.combined(p.log()).argmax(-1).item() == 1  # two of three vote for label 1
    with pytest.raises(SoftPromptError, match="at least two prompts"):
        Ensemble(ens.backbone, ens.members[:1])
    with pytest.raises(SoftPromptError, match="unknown ensemble combination"):
        Ensemble(ens.backbone, ens.members, "median")


def test_an_encoder_ensemble_scores_member_by_member():
    from test_encoders import HEAD_TASK, make_encoder

    from softprompt.methods import Headed

    bb = make_encoder("bert")
    members = [Headed.create_for(PromptTuning.create(bb, num_virtual_tokens=2, init="random", seed=s), bb, 2, s)
               for s in (0, 1)]
    ens = Ensemble(bb, members, "vote")
    assert not ens.mixed
    enc = task_encoder(TaskSpec(**HEAD_TASK), bb, 2)
    m = evaluate_ensemble(ens, enc, synthetic_splits()["test"][:40])
    assert m["n"] == 40 and len(m["members"]) == 2 and m["combine"] == "vote"
    from softprompt.evaluate import evaluate

    for one, method in zip(m["members"], members, strict=True):
        assert one["accuracy"] == evaluate(PromptedModel(bb, method), enc, synthetic_splits()["test"][:40])["accuracy"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ens")
    task = write_model_and_data(tmp, 256)
    paths = []
    for seed in (0, 1):
        cfg = {"model": str(tmp / "model"), "task": task, "out_dir": str(tmp / f"run{seed}"), "seed": seed,
               "method": {"num_virtual_tokens": 4, "init": "random"},
               "train": {"steps": 30, "batch_size": 16, "lr": 0.1, "eval_every": 30, "precision": "float32"}}
        (tmp / f"run{seed}.yaml").write_text(json.dumps(cfg))
        assert main(["train", str(tmp / f"run{seed}.yaml")]) == 0
        paths.append(str(tmp / f"run{seed}" / "prompt.safetensors"))
    return tmp, paths


def test_eval_of_several_prompts_reports_each_and_the_ensemble(two_runs, capsys):
    tmp, (a, b) = two_runs
    capsys.readouterr()
    assert main(["eval", a, "--prompt", b, "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["prompts"] == [a, b] and len(m["members"]) == 2 and m["n"] == 128
    alone = []
    for p in (a, b):
        assert main(["eval", p, "--json"]) == 0
        alone.append(json.loads(capsys.readouterr().out)["accuracy"])
    assert [one["accuracy"] for one in m["members"]] == alone
    assert main(["eval", a, b, "--ensemble", "vote"]) == 0
    out = capsys.readouterr().out
    assert "ensemble of 2" in out and "points over the best prompt alone" in out


def test_an_ensemble_of_prompts_for_different_tasks_is_refused(two_runs, capsys, tmp_path):
    _, (a, _) = two_runs
    import softprompt as sp

    other = sp.load_prompt(a)
    path = sp.save_prompt(tmp_path / "other.safetensors", PromptTuning(other.tensors["prompt"]),
                          task={**SYNTH_TASK, "name": "another"})
    capsys.readouterr()
    assert main(["eval", a, str(path)]) == 2
    assert "must be for one task" in capsys.readouterr().err


def test_a_served_ensemble_task_answers_as_the_offline_ensemble(tmp_path):
    """A sub-folder of prompt files is one served task: each request scored under every member in the same batch
    as other tasks' rows, the label and mean probabilities equal to the offline Ensemble's (mean and vote)."""
    from fastapi.testclient import TestClient

    import softprompt as sp
    from softprompt.serve import PromptBank
    from softprompt.serve.app import create_app
    from softprompt.serve.engine import Engine

    bb = make_backbone("llama")
    members = [PromptTuning.create(bb, num_virtual_tokens=4, init="random", seed=s) for s in (1, 2, 3)]
    folder = tmp_path / "prompts"
    (folder / "synth").mkdir(parents=True)
    for i, m in enumerate(members):
        sp.save_prompt(folder / "synth" / f"seed{i}.safetensors", m, bb, task=SYNTH_TASK)
    sp.save_prompt(folder / "single.safetensors", members[0], bb, task=SYNTH_TASK)
    (folder / "bad").mkdir()  # two prompts of different tasks: refused, the rest served
    sp.save_prompt(folder / "bad" / "a.safetensors", members[0], bb, task=SYNTH_TASK)
    sp.save_prompt(folder / "bad" / "b.safetensors", members[1], bb, task={**SYNTH_TASK, "name": "another"})
    bank = PromptBank(bb, folder)
    assert bank.names() == ["single", "synth"] and "trained for another task" in bank.refused["bad"]
    rows = synthetic_splits()["test"][:6]
    enc = task_encoder(TaskSpec(**SYNTH_TASK), bb, 4)
    labels = enc.task.labels
    engine = Engine(bank, max_batch=8, window_ms=30).start()
    try:
        with TestClient(create_app(engine)) as client:
            for combine in ("mean", "vote"):
                if combine == "vote":
                    (folder / "synth" / "ensemble.json").write_text(json.dumps({"combine": "vote"}))
                    assert bank.sync_folder(folder)["replaced"] == ["synth"]
                ens = Ensemble(bb, members, combine)
                r = client.post("/v1/classify", json={"model": "synth", "input": [x["text"] for x in rows]})
                assert r.status_code == 200, r.text
                got = r.json()["data"]
                batch = next(enc.eval_batches(rows, len(rows)))[1]
                with torch.no_grad():
                    logp = ens.member_scores(enc, batch)
                want = ens.combined(logp).argmax(-1).tolist()
                mean = logp.exp().mean(0).log()
                for i, item in enumerate(got):
                    assert item["label"] == labels[want[i]], (combine, i)
                    assert torch.allclose(torch.tensor([item["scores"][k] for k in labels]), mean[i], atol=1e-4)
            listed = {m["id"]: m["softprompt"] for m in client.get("/v1/models").json()["data"]}
            assert listed["synth"]["ensemble"] == {"members": 3, "combine": "vote"}
            r = client.post("/v1/completions", json={"model": "synth", "prompt": "a b", "max_tokens": 2})
            assert r.status_code == 400 and "ensemble of 3" in r.json()["error"]["message"]
    finally:
        engine.stop()
