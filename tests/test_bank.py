"""The prompt bank: many prompts on one backbone, checked on add, replaced and removed at run time."""

import threading

import pytest
import torch
from conftest import make_backbone

import softprompt as sp
from softprompt.prompts import content_hash
from softprompt.serve import PromptBank, UnknownTask


@pytest.fixture
def folder(tmp_path, llama):
    for i, name in enumerate(["sentiment", "topic", "qa"]):
        sp.save_prompt(tmp_path / f"{name}.safetensors",
                       sp.PromptTuning.create(llama, num_virtual_tokens=2 + 2 * i, seed=i), llama,
                       task={"name": name})
    other = make_backbone("llama", seed=5)
    sp.save_prompt(tmp_path / "foreign.safetensors", sp.PromptTuning.create(other, num_virtual_tokens=2), other)
    return tmp_path


def test_folder_loads_tasks_and_refuses_a_foreign_prompt(folder, llama):
    bank = PromptBank(llama, folder)
    assert bank.names() == ["qa", "sentiment", "topic"]
    assert "foreign.safetensors" in bank.refused and "trained on backbone" in bank.refused["foreign.safetensors"]
    assert bank.get("topic").num_virtual_tokens == 4 and bank.get("topic").task == {"name": "topic"}
    with pytest.raises(UnknownTask, match="unknown task 'nope'; known tasks: qa, sentiment, topic"):
        bank.get("nope")


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden", "x" * 65, "a\\b"])
def test_task_names_with_path_characters_are_refused(folder, llama, name):
    bank = PromptBank(llama)
    with pytest.raises(sp.SoftPromptError, match="invalid task name"):
        bank.add(name, folder / "qa.safetensors")


def test_replace_invalidates_the_cached_key_values(folder, llama):
    bank = PromptBank(llama, folder)
    old = bank.get("qa")
    first = sp.generate(llama, old.prompt, ["the movie was"], max_new_tokens=4)
    assert sp.runtime(llama).cache.holds(old.digest)
    with pytest.raises(sp.SoftPromptError, match="already exists"):
        bank.add("qa", folder / "topic.safetensors")
    new_prompt = sp.PromptTuning.create(llama, num_virtual_tokens=6, seed=99)
    sp.save_prompt(folder / "qa2.safetensors", new_prompt, llama)
    bank.add("qa", folder / "qa2.safetensors", replace=True)
    assert not sp.runtime(llama).cache.holds(old.digest)  # stale key/values dropped
    entry = bank.get("qa")
    assert entry.digest == content_hash(new_prompt()) != old.digest
    now = sp.generate(llama, entry.prompt, ["the movie was"], max_new_tokens=4)
    assert now.tokens == sp.generate(llama, new_prompt, ["the movie was"], max_new_tokens=4,
                                     reuse_prompt_cache=False).tokens
    assert first.tokens == sp.generate(llama, old.prompt, ["the movie was"], max_new_tokens=4).tokens  # in-flight copy
    bank.remove("qa")
    with pytest.raises(UnknownTask):
        bank.remove("qa")


def test_hot_add_and_remove_under_concurrent_requests(folder, llama):
    bank = PromptBank(llama, folder)
    expected = {n: sp.generate(llama, bank.get(n).prompt, ["the plot was"], max_new_tokens=3).tokens[0]
                for n in ("sentiment", "topic")}
    errors, stop = [], threading.Event()

    def client(name):
        while not stop.is_set():
            try:
                got = sp.generate(llama, bank.get(name).prompt, ["the plot was"], max_new_tokens=3).tokens[0]
                if got != expected[name]:
                    errors.append((name, got))
            except Exception as e:  # noqa: BLE001 - any failure is a test failure
                errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(n,)) for n in ("sentiment", "topic")]
    for t in threads:
        t.start()
    for i in range(20):  # churn another task while the clients run
        bank.add("qa", folder / ("qa.safetensors" if i % 2 else "topic.safetensors"), replace=True)
        if i % 5 == 4:
            bank.remove("qa")
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert torch.equal(bank.get("sentiment").prompt.embeddings,
                       sp.load_prompt(folder / "sentiment.safetensors").tensors["prompt"])


def test_mixed_task_classification_equals_each_task_alone(llama):
    """Two tasks (single-token and multi-token verbalizers, prompts of 3 and 6 tokens) and a prompt-less row
    scored in one batch give the scores each gets from its own PromptedModel."""
    from conftest import SYNTH_TASK

    from softprompt.serve.score import score_mixed
    from softprompt.tasks.encode import TaskEncoder
    from softprompt.tasks.spec import TaskSpec

    single = TaskSpec(**SYNTH_TASK)
    multi = TaskSpec(**{**SYNTH_TASK, "verbalizer": {"positive": [" very good", " yes"], "negative": " not good"}})
    pa = sp.PromptTuning.create(llama, num_virtual_tokens=3, seed=1)
    pb = sp.PromptTuning.create(llama, num_virtual_tokens=6, seed=2)
    enc = {id(single): TaskEncoder(single, llama.tokenizer, 6, llama.max_positions, llama.pad_token_id),
           id(multi): TaskEncoder(multi, llama.tokenizer, 6, llama.max_positions, llama.pad_token_id)}
    cases = [(pa, single, "the movie was good"), (pb, multi, "bad plot"), (None, single, "it was fun"),
             (pb, single, "the actors were awful"), (pa, multi, "a very boring story")]
    requests = [(None if p is None else p.weight.detach(), enc[id(t)].encode_input({"text": x}), enc[id(t)])
                for p, t, x in cases]
    mixed = score_mixed(llama, requests)
    for (p, t, x), got in zip(cases, mixed, strict=True):
        e = enc[id(t)]
        model = sp.PromptedModel(llama, p if p is not None else sp.PromptTuning(torch.empty(0, 32))).eval()
        with torch.no_grad():
            alone = e.label_scores(model, e.classification_batch([{"text": x, "label": "positive"}]))[0]
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)
