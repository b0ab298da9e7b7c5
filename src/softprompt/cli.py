"""The softprompt command line. Each subcommand is a plain function; user mistakes print one line, no traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import SoftPromptError


def cmd_generate(args: argparse.Namespace) -> None:
    from .backbones import load_backbone
    from .generation import generate
    from .methods import load_method

    texts = args.text or ([] if sys.stdin.isatty() else [line.rstrip("\n") for line in sys.stdin if line.strip()])
    if not texts:
        raise SoftPromptError("no input text; pass TEXT arguments or lines on stdin")
    bb = load_backbone(args.model, dtype=args.dtype, device=args.device)
    prompt = load_method(args.prompt, bb) if args.prompt else None
    out = generate(bb, prompt, texts, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                   stop=args.stop or None, chat=args.chat)
    if args.json:
        print(json.dumps([{"input": i, "output": o} for i, o in zip(texts, out.texts, strict=True)], indent=2))
    else:
        for text in out.texts:
            print(text)


def cmd_inspect(args: argparse.Namespace) -> None:
    from .files import check_prompt, read_prompt

    pf = read_prompt(args.file)
    check_prompt(pf)
    size = sum(p.stat().st_size for p in ([pf.path] if pf.path.is_file() else pf.path.iterdir()))
    print(f"file:      {pf.path} ({size:,} bytes)")
    print(f"method:    {pf.method}")
    for k, v in pf.tensors.items():
        print(f"tensor:    {k} {tuple(v.shape)} {str(v.dtype).replace('torch.', '')}  "
              f"(norm per token: mean {v.float().norm(dim=-1).mean():.3f})")
    meta = {k: v for k, v in pf.metadata.items() if k != "backbone"}
    bb_meta = pf.metadata.get("backbone") or {}
    print(f"backbone:  {bb_meta.get('name')} (fingerprint {bb_meta.get('fingerprint_id', 'unknown')})")
    for k, v in sorted(meta.items()):
        print(f"{k + ':':10} {json.dumps(v) if isinstance(v, (dict, list)) else v}")
    if args.png:
        from .pictures import pixel_prompt_image

        pixel_prompt_image(pf).save(args.png)
        print(f"wrote {args.png}: the learned pixels where the prompt is added (checkerboard: the image shows through)")
    model = args.model or (bb_meta.get("name") if args.nearest else None)
    if args.nearest and "prompt" not in pf.tensors:
        print(f"nearest tokens: a {pf.metadata.get('prompt_kind', pf.method)} prompt has no vectors in a vocabulary's "
              "space")
    elif args.nearest and model:
        import torch

        from .backbones import load_backbone
        from .files import check_prompt as check

        bb = load_backbone(model, device="cpu")
        check(pf, bb)
        emb = torch.nn.functional.normalize(bb.embedding_matrix.detach().float(), dim=-1)  # (V, H)
        prompt = torch.nn.functional.normalize(pf.tensors["prompt"].float(), dim=-1)  # (P, H)
        sims = prompt @ emb.T  # (P, V) cosine similarity
        top = sims.topk(args.nearest, dim=-1)
        print(f"nearest vocabulary tokens (cosine), backbone {bb.name}:")
        for i, (vals, ids) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
            words = "  ".join(f"{bb.tokenizer.decode([t])!r}:{v:.2f}" for v, t in zip(vals, ids, strict=True))
            print(f"  {i:3d}  {words}")
    elif args.nearest:
        print("nearest tokens: the file names no backbone; pass --model")


def cmd_predict(args: argparse.Namespace) -> None:
    import torch

    from .backbones import load_backbone
    from .files import check_prompt, read_prompt
    from .methods import from_file
    from .model import PromptedModel
    from .tasks.detection import DetectionEncoder
    from .tasks.images import ImageEncoder
    from .tasks.spec import load_task

    pf = read_prompt(args.prompt)
    task = pf.metadata.get("task") or {}
    if task.get("modality") not in ("image", "detection"):
        raise SoftPromptError(f"{args.prompt} is not an image task's prompt; predict classifies images (for text "
                              "use softprompt eval or serve)")
    model = args.model or (pf.metadata.get("backbone") or {}).get("name")
    if not model:
        raise SoftPromptError(f"{args.prompt} names no backbone; pass --model")
    bb = load_backbone(model)
    check_prompt(pf, bb)
    pre = pf.metadata.get("preprocessing") or bb.preprocessing
    prompted = PromptedModel(bb, from_file(pf, bb.device))
    out = []
    if task["modality"] == "detection":  # each image's objects, boxes in its own pixels
        det = DetectionEncoder(load_task(task), pre)
        for f in args.images:
            pixels, (w, h) = det.read(f, bb.device)
            with torch.no_grad():
                logits, boxes = prompted.detect(pixels)
            out.append({"file": f, "objects": det.objects(logits[0], boxes[0], w, h, args.threshold)})
        if args.json:
            print(json.dumps(out, indent=2))
            return
        for r in out:
            found = ", ".join(f"{o['label']} {o['score']:.2f} at {o['box']}" for o in r["objects"]) or "nothing"
            print(f"{r['file']}: {found}")
        return
    enc = ImageEncoder(load_task(task), pre)
    for start in range(0, len(args.images), 16):
        files = args.images[start:start + 16]
        with torch.no_grad():
            logp = prompted.classify(enc.pixels(files, bb.device)).float().log_softmax(-1)
        for f, row in zip(files, logp, strict=True):
            order = row.argsort(descending=True).tolist()
            out.append({"file": f, "label": enc.task.labels[order[0]],
                        "scores": {enc.task.labels[k]: round(float(row[k]), 4) for k in order}})
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for r in out:
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(r["scores"].items())[:args.top])
        print(f"{r['file']}: {r['label']}  (log-probabilities: {top})")


def cmd_export(args: argparse.Namespace) -> None:
    from .files import export_peft, read_prompt

    pf = read_prompt(args.file)
    out = export_peft(pf, args.peft, base_model_name_or_path=args.base_model, overwrite=args.force)
    print(f"wrote PEFT prompt-tuning folder {out} (load with peft.PeftModel.from_pretrained(base_model, '{out}'))")


def cmd_import(args: argparse.Namespace) -> None:
    from .files import import_peft, save_prompt

    pf = import_peft(args.folder)
    bb = None
    if args.model:
        from .backbones import load_backbone

        bb = load_backbone(args.model, device="cpu")
    from .methods import from_file

    module = from_file(pf)
    if bb is not None:
        module.check_backbone(bb)
    path = save_prompt(args.out, module, bb, overwrite=args.force, extra={"imported_from": pf.metadata["imported_from"]})
    print(f"wrote {path} ({module.num_virtual_tokens} virtual tokens x {module.hidden_size})")


def _split_config(extra: list[str]) -> tuple[str | None, list[str]]:
    """The CONFIG file among the free arguments (a .yaml/.yml/.json path that is not an option's value)."""
    for i, item in enumerate(extra):
        if item.endswith((".yaml", ".yml", ".json")) and (i == 0 or not extra[i - 1].startswith("--")
                                                           or "=" in extra[i - 1]):
            return item, extra[:i] + extra[i + 1:]
    return None, extra


def _config(args: argparse.Namespace, extra: list[str]):
    from .train.config import load_config

    path, rest = _split_config(extra)
    return load_config(path, rest)


def cmd_train(args: argparse.Namespace, extra: list[str]) -> None:
    from .train.loop import fit

    configs = [x for i, x in enumerate(extra) if x.endswith((".yaml", ".yml", ".json"))
               and (i == 0 or not extra[i - 1].startswith("--") or "=" in extra[i - 1])]
    if len(configs) > 1:  # several tasks in one run: one forward per step for all of them
        from .train.config import load_config
        from .train.multi import fit_many

        if args.search:
            raise SoftPromptError("--search tries one task's settings; search each task on its own")
        rest = [x for x in extra if x not in configs]
        for res in fit_many([load_config(c, rest) for c in configs], resume=args.resume, overwrite=args.overwrite):
            _print_result(res)
        return
    cfg = _config(args, extra)
    if args.search:
        from .train.search import parse_grid, search

        if args.resume:
            raise SoftPromptError("--search starts its trials afresh; drop --resume")
        result = search(cfg, parse_grid(args.search), overwrite=args.overwrite)
        for t in result["trials"]:
            print(f"{t['trial']}: validation {t['selected_on']} {t['score']:.4f} (best step {t['best_step']})")
        print(f"best: {result['best']['trial']}; its prompt: {result['prompt']} (all trials: "
              f"{Path(cfg.out_dir) / 'search.json'})")
        return
    _print_result(fit(cfg, resume=args.resume, overwrite=args.overwrite))


def _print_result(res) -> None:
    if res.prompt_path is None:  # a non-main DDP rank
        return
    r = res.report
    unit = r.get("unit", "tokens")
    print(f"saved {res.prompt_path}: the best prompt on validation (step {res.best_step} of {res.final_step}, "
          f"stopped by {res.stopped}): {json.dumps(res.best)}")
    print(f"trainable {r['trainable_params']:,} of {r['total_params']:,} parameters "
          f"({r['trainable_share']:.4%}); {r['bytes_per_task']:,} bytes per task; {r['tokens_processed']:,} {unit} "
          f"in {r['train_seconds']:.0f} s ({r['tokens_per_second']:.0f} {unit}/s); peak RSS {r['peak_rss_mb']:.0f} MB")


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> None:
    from .compare import compare, markdown_table
    from .evaluate import evaluate
    from .files import read_prompt
    from .model import PromptedModel
    from .precision import resolve_precision
    from .tasks.spec import load_task, load_task_splits, task_encoder

    prompts = [p for p in [*args.prompt, *args.more] if not p.endswith((".yaml", ".yml", ".json"))]
    extra = [p for p in args.prompt if p.endswith((".yaml", ".yml", ".json"))] + extra
    pf = read_prompt(prompts[0])
    values = {}
    if pf.metadata.get("task"):
        values["task"] = pf.metadata["task"]
    if (pf.metadata.get("backbone") or {}).get("name"):
        values["model"] = pf.metadata["backbone"]["name"]
    from .train.config import apply_overrides, build_config, load_config

    path, rest = _split_config(extra)
    cfg = load_config(path, rest) if path else build_config(apply_overrides(values, rest))
    if args.baselines:
        if len(prompts) > 1:
            raise SoftPromptError("--baselines compares one prompt; evaluate an ensemble without it")
        result = compare(cfg, prompt_file=prompts[0], baselines=("zero_shot", "few_shot", "prompt_tuning"),
                         k_shot=args.k_shot, test_examples=args.limit, out=args.out)
        print(json.dumps(result, indent=2) if args.json else markdown_table(result))
        return
    from .backbones import load_backbone
    from .files import check_prompt

    bb = load_backbone(cfg.model, dtype=cfg.dtype, device=cfg.device)
    check_prompt(pf, bb)
    from .methods import from_file

    method = from_file(pf, bb.device)
    task = load_task(cfg.task)
    if len(prompts) > 1:
        return _eval_ensemble(args, cfg, bb, task, [pf, *map(read_prompt, prompts[1:])])
    enc = task_encoder(task, bb, method.num_virtual_tokens)
    rows, bad = enc.check_rows(load_task_splits(task, cfg.seed).get(args.split, []), args.split,
                               cfg.train.skip_bad_rows)
    if args.limit and len(rows) > args.limit:
        import random

        rows = random.Random(cfg.seed + 1).sample(rows, args.limit)
    m = evaluate(PromptedModel(bb, method), enc, rows, resolve_precision(cfg.train.precision, bb.device))
    if args.png and "confusion" in m:
        from .pictures import confusion_png

        confusion_png(m, args.png, f"{task.name} {args.split}: accuracy {m['accuracy']:.1%} (n={m['n']})")
    if args.json:
        print(json.dumps({**m, "skipped_rows": bad.skipped}, indent=2))
        return
    if "accuracy" in m:
        print(f"{task.name} {args.split} ({m['n']} rows{f', {bad.skipped} skipped' if bad.skipped else ''}): "
              f"accuracy {m['accuracy']:.2%}, macro-F1 {m['macro_f1']:.4f}, loss {m['loss']:.4f}")
        labels = m["confusion"]["labels"]
        w = max(8, *map(len, labels))
        print("confusion (rows: gold, columns: predicted)")
        print(" " * w + "".join(f"{lab[:w]:>{w + 1}}" for lab in labels))
        for lab, row in zip(labels, m["confusion"]["matrix"], strict=True):
            print(f"{lab[:w]:>{w}}" + "".join(f"{v:>{w + 1}}" for v in row))
    else:
        print(f"{task.name} {args.split} ({m['n']} rows): exact match {m['exact_match']:.2%}, loss {m['loss']:.4f}")


def _eval_ensemble(args: argparse.Namespace, cfg, bb, task, files: list) -> None:
    """Every member alone and their ensemble on the same rows, one pass."""
    from .ensemble import Ensemble, evaluate_ensemble
    from .files import check_prompt
    from .methods import from_file
    from .precision import resolve_precision
    from .tasks.spec import load_task_splits, task_encoder

    names = {(f.metadata.get("task") or {}).get("name") for f in files}
    if len(names) > 1:
        raise SoftPromptError(f"an ensemble's prompts must be for one task; these are for {sorted(map(str, names))}")
    members = []
    for f in files:
        check_prompt(f, bb)
        members.append(from_file(f, bb.device))
    enc = task_encoder(task, bb, max(m.num_virtual_tokens for m in members))
    if task.kind != "classification":
        raise SoftPromptError("an ensemble combines label probabilities: it needs a classification task")
    rows, bad = enc.check_rows(load_task_splits(task, cfg.seed).get(args.split, []), args.split,
                               cfg.train.skip_bad_rows)
    if args.limit and len(rows) > args.limit:
        import random

        rows = random.Random(cfg.seed + 1).sample(rows, args.limit)
    m = evaluate_ensemble(Ensemble(bb, members, args.ensemble), enc, rows,
                          precision=resolve_precision(cfg.train.precision, bb.device))
    paths = [str(f.path) for f in files]
    if args.json:
        print(json.dumps({**m, "prompts": paths, "skipped_rows": bad.skipped}, indent=2))
        return
    print(f"{task.name} {args.split} ({m['n']} rows): each prompt alone, then their ensemble ({args.ensemble})")
    for path, one in zip(paths, m["members"], strict=True):
        print(f"  {path}: accuracy {one['accuracy']:.2%}, macro-F1 {one['macro_f1']:.4f}")
    best = max(one["accuracy"] for one in m["members"])
    print(f"  ensemble of {len(paths)}: accuracy {m['accuracy']:.2%}, macro-F1 {m['macro_f1']:.4f} "
          f"({(m['accuracy'] - best) * 100:+.2f} points over the best prompt alone)")


def cmd_compare(args: argparse.Namespace, extra: list[str]) -> None:
    from .compare import compare, markdown_table

    cfg = _config(args, extra)
    result = compare(cfg, prompt_file=args.prompt, baselines=tuple(b.strip() for b in args.baselines.split(",")),
                     k_shot=args.k_shot, test_examples=args.limit, out=args.out or cfg.out_dir,
                     overwrite=args.overwrite, search_steps=args.search_steps, resume=args.resume)
    print(json.dumps(result, indent=2) if args.json else markdown_table(result))


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> None:
    from .demo import run

    run(model_name=args.model, steps=args.steps, n_test=args.n_test, out=args.out, overrides=extra)


def cmd_serve(args: argparse.Namespace) -> None:
    import logging
    import os
    import shlex

    import uvicorn

    from .serve.app import build_server, check_port_free, create_app

    api_key = args.api_key or os.environ.get("SOFTPROMPT_API_KEY") or None
    check_port_free(args.host, args.port)
    for flag, value in (("--max-batch", args.max_batch), ("--step-tokens", 1 if args.step_tokens is None else args.step_tokens),
                        ("--max-queue", args.max_queue), ("--request-timeout", args.request_timeout),
                        ("--max-body-mb", args.max_body_mb), ("--body-timeout", args.body_timeout)):
        if value <= 0:
            raise SoftPromptError(f"{flag} must be positive (got {value})")
    engine = build_server(args.model, args.prompts, dtype=args.dtype, device=args.device, max_batch=args.max_batch,
                          window_ms=args.window_ms, reuse_prompt_cache=not args.no_prompt_cache,
                          continuous=not args.no_continuous, pace=not args.no_pacing, step_tokens=args.step_tokens,
                          max_queue=args.max_queue,
                          engine=args.engine, vllm_python=args.vllm_python, vllm_url=args.vllm_url,
                          vllm_args=tuple(shlex.split(args.vllm_args or "")))
    bank = engine.bank
    print(f"softprompt serve: {engine.model_name} with {len(bank)} task(s): {', '.join(bank.names()) or 'none'}",
          file=sys.stderr)
    for name, why in bank.refused.items():
        print(f"softprompt serve: refused {name}: {why}", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print("softprompt serve: warning: listening beyond loopback without --api-key", file=sys.stderr)
    if args.engine == "vllm" and args.vllm_url is None:
        print("softprompt serve: starting the vLLM server (a minute or more)...", file=sys.stderr)
    if hasattr(engine, "warm_up"):  # the built-in engine: its per-row-count structures made before the first request
        engine.warm_up()
    engine.start()
    logging.basicConfig(level=logging.INFO)
    try:
        app = create_app(engine, api_key=api_key, prompts_dir=args.prompts, request_timeout=args.request_timeout,
                         max_body_bytes=int(args.max_body_mb * 2**20), body_timeout=args.body_timeout)
        # SIGTERM: uvicorn stops listening and waits for open requests (at most drain_s); then the engine stops,
        # failing what is left, and the process exits 0. uvicorn hands the signal back to the handler that was
        # there before it once it is done: ours notes it instead of killing the process before the clean-up.
        import signal

        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=max(1, int(args.drain_s)))
    finally:
        engine.stop(drain_s=1.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softprompt", description="Prompt tuning for frozen pretrained models.")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an unexpected error (or set SOFTPROMPT_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_args(sp, required=True):
        sp.add_argument("--model", required=required, help="built-in name (smollm2-135m), model folder, .gguf file or hub id")
        sp.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bf16 on GPU)")
        sp.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")

    g = sub.add_parser("generate", help="generate text with (or without) a soft prompt",
                       description="Continue each TEXT after the soft prompt; the prompt's key/values are computed once.")
    model_args(g)
    g.add_argument("text", nargs="*", help="input texts (default: lines on stdin)")
    g.add_argument("--prompt", help="prompt file (.safetensors) or PEFT adapter folder")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap each text in the model's chat template")
    g.add_argument("--json", action="store_true", help="print JSON")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="show a prompt file: shape, metadata, size, nearest tokens",
                       description="Show a prompt file's shape, metadata, size in bytes and the nearest vocabulary "
                                   "tokens of each prompt vector.")
    i.add_argument("file", help="prompt file or PEFT adapter folder")
    i.add_argument("--model", help="backbone for nearest tokens (default: the one named in the file)")
    i.add_argument("--nearest", type=int, default=3, help="nearest tokens per vector (0 = skip)")
    i.add_argument("--png", metavar="FILE", help="a pixel prompt: write a picture of the learned pixels")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser("predict", help="classify image files (or find objects in them) with an image prompt",
                       description="The label and scores of each image under an image task's prompt file, or the "
                                   "objects a detection task's prompt finds (label, score, box in the image's "
                                   "pixels); the backbone named in the file unless --model is given.")
    r.add_argument("prompt", help="prompt file of an image task")
    r.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    r.add_argument("--model", help="backbone (default: the one named in the file)")
    r.add_argument("--top", type=int, default=3, help="labels shown per image")
    r.add_argument("--threshold", type=float, default=0.5, help="detection: the lowest score of an object shown")
    r.add_argument("--json", action="store_true", help="print one JSON document")
    r.set_defaults(func=cmd_predict)

    e = sub.add_parser("export", help="export a prompt file to a PEFT prompt-tuning folder",
                       description="Write adapter_config.json + adapter_model.safetensors that peft loads.")
    e.add_argument("file", help="prompt file (.safetensors)")
    e.add_argument("--peft", required=True, metavar="DIR", help="output folder")
    e.add_argument("--base-model", help="base_model_name_or_path to record (default: the file's backbone name)")
    e.add_argument("--force", action="store_true", help="write into a non-empty folder")
    e.set_defaults(func=cmd_export)

    m = sub.add_parser("import", help="import a PEFT prompt-tuning folder as a prompt file",
                       description="Read a PEFT PROMPT_TUNING folder (no code run, no pickles) and write a prompt file.")
    m.add_argument("folder", help="PEFT adapter folder")
    m.add_argument("out", help="prompt file to write (.safetensors)")
    m.add_argument("--model", help="backbone to stamp (fingerprint) into the file")
    m.add_argument("--force", action="store_true", help="overwrite OUT")
    m.set_defaults(func=cmd_import)

    t = sub.add_parser("train", help="train a soft prompt (YAML config + --group.key value overrides)",
                       usage="softprompt train [CONFIG.yaml ...] [--resume] [--overwrite] [--group.key VALUE ...]",
                       description="Train a prompt as CONFIG says; any config key can be overridden on the command "
                                   "line, e.g. --train.lr 0.3 --method.num_virtual_tokens 50 --task reuters_r8. "
                                   "Several CONFIGs (one model, one run folder each): their tasks train together, "
                                   "every step one forward for all their rows, each prompt saved in its own folder.")
    t.add_argument("--resume", action="store_true", help="continue the run in out_dir from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace the run already in out_dir")
    t.add_argument("--search", action="append", metavar="KEY=V1,V2",
                   help="try each value on validation, keep the best (repeatable: every combination), e.g. "
                        "--search lr=1e-3,3e-3,1e-2 --search method.num_virtual_tokens=10,20")
    t.set_defaults(func=cmd_train, extra=True)

    v = sub.add_parser("eval", help="accuracy, macro-F1 and confusion matrix of a prompt on a split",
                       usage="softprompt eval PROMPT [PROMPT ...] [CONFIG.yaml] [--split test] [--baselines] "
                             "[--group.key VALUE ...]",
                       description="Evaluate a prompt file on a split of its task (task and model come from the "
                                   "file's metadata unless given). --baselines adds zero-shot and few-shot rows. "
                                   "Several prompt files of one task: their ensemble, beside each one alone.")
    v.add_argument("prompt", nargs="+", help="prompt file; several: an ensemble of prompts for one task")
    v.add_argument("--prompt", dest="more", action="append", default=[], metavar="FILE",
                   help="another member of the ensemble (the same as naming it after the first)")
    v.add_argument("--ensemble", choices=["mean", "vote"], default="mean",
                   help="how an ensemble combines its members: mean probability (default) or majority vote")
    v.add_argument("--split", default="test", choices=["train", "validation", "test"])
    v.add_argument("--limit", type=int, default=None, help="evaluate a seeded sample of this many rows")
    v.add_argument("--baselines", action="store_true", help="also zero-shot and few-shot, in one table")
    v.add_argument("--k-shot", type=int, default=4)
    v.add_argument("--out", default=None, help="folder for compare.json / compare.md (with --baselines)")
    v.add_argument("--json", action="store_true", help="print the result as one JSON document")
    v.add_argument("--png", metavar="FILE", help="also draw the confusion matrix into this PNG")
    v.set_defaults(func=cmd_eval, extra=True)

    c = sub.add_parser("compare", help="every method and baseline side by side on one test split, one table",
                       usage="softprompt compare [CONFIG.yaml] [--prompt FILE] [--baselines LIST] [--group.key VALUE ...]",
                       description="Run the rows on the same test split and frozen model (each trained row with the "
                                   "same step budget, its best validation step kept, its learning rate chosen on "
                                   "validation); print a markdown table and write compare.json / compare.md. Rows: "
                                   "zero_shot, few_shot, linear_probe, prompt_tuning, residual, p_tuning, "
                                   "prefix_tuning, p_tuning_v2, lora, fine_tune.")
    c.add_argument("--prompt", help="a trained prompt_tuning prompt for that row instead of training one")
    c.add_argument("--baselines", default="zero_shot,few_shot,prompt_tuning,fine_tune", help="comma-separated rows")
    c.add_argument("--search-steps", type=int, default=None,
                   help="steps per learning-rate candidate (default: a third of train.steps; 0: no search)")
    c.add_argument("--k-shot", type=int, default=4)
    c.add_argument("--limit", type=int, default=None, help="test on a seeded sample of this many rows")
    c.add_argument("--out", default=None, help="folder for the table (default: out_dir)")
    c.add_argument("--overwrite", action="store_true", help="replace a run already in out_dir")
    c.add_argument("--resume", action="store_true",
                   help="keep the rows a stopped comparison with the same settings finished in --out; run the rest")
    c.add_argument("--json", action="store_true", help="print the result as one JSON document")
    c.set_defaults(func=cmd_compare, extra=True)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server: many tasks (prompt files) on one backbone",
                       description="Serve every prompt file in --prompts (task name = file name without .safetensors) "
                                   "on one frozen backbone; `model` in a request names a task, or the backbone itself "
                                   "for no prompt. Requests arriving together are batched across tasks.")
    model_args(s)
    s.add_argument("--prompts", default=None, metavar="DIR", help="folder of prompt files (reload: POST /admin/reload)")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or set SOFTPROMPT_API_KEY)")
    s.add_argument("--max-batch", type=int, default=32, help="most rows decoding at once")
    s.add_argument("--window-ms", type=float, default=5.0, help="how long a first request waits for others when idle, and (at most a tenth of a decode step) how long a step after rows finish waits for new requests")
    s.add_argument("--step-tokens", type=int, default=None,
                   help="a decode step's token budget: new prompts' tokens + running rows (default 512 on CPU, 2048 "
                        "on GPU)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="most requests waiting; past it, 503 with Retry-After (default 256)")
    s.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may wait for its answer; 504 after (default 600)")
    s.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body accepted (default 16 MB)")
    s.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may take to arrive; 408 after (default 30)")
    s.add_argument("--drain-s", type=float, default=30.0,
                   help="on SIGTERM, seconds in-flight requests get to finish before they are failed (default 30)")
    s.add_argument("--no-continuous", action="store_true",
                   help="run each batch to its end before taking new requests (the older policy; benchmarking)")
    s.add_argument("--no-pacing", action="store_true",
                   help="take every waiting request the step budget allows at once, instead of spreading a burst "
                        "over steps (see docs/serving.md)")
    s.add_argument("--no-prompt-cache", action="store_true", help="recompute each prompt per batch (benchmarking)")
    s.add_argument("--engine", default="builtin", choices=["builtin", "vllm"],
                   help="what runs the model: the built-in engine, or a vLLM server fed prompt embeddings (input-"
                        "embedding prompts only; see docs/serving.md)")
    s.add_argument("--vllm-python", default=None, metavar="PATH",
                   help="--engine vllm: start a vLLM server with this Python (default: $SOFTPROMPT_VLLM_PYTHON, or "
                        ".venv-vllm/bin/python)")
    s.add_argument("--vllm-url", default=None, metavar="URL",
                   help="--engine vllm: use the vLLM server running at URL (started with --enable-prompt-embeds)")
    s.add_argument("--vllm-args", default=None, metavar="ARGS",
                   help="--engine vllm: more flags for the vLLM server it starts, e.g. '--tensor-parallel-size 2'")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="the built-in demo: train a prompt on Rotten Tomatoes with SmolLM2-135M",
                       description="Train, evaluate against zero-shot, save and generate, on real data and a real model.")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's measured budget)")
    d.add_argument("--n-test", type=int, default=400)
    d.add_argument("--out", default="runs/demo")
    d.set_defaults(func=cmd_demo, extra=True)
    return p


def write_crash_log(command: str, exc: BaseException) -> str:
    """The full traceback of an unexpected error, in a file under the cache's logs/ folder; returns its path."""
    import os
    import tempfile
    import time
    import traceback
    from pathlib import Path

    from .cache import cache_dir

    text = "".join(traceback.format_exception(exc))
    name = f"softprompt-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (cache_dir() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(f"softprompt {' '.join(sys.argv[1:])}\n\n{text}")
            return str(path)
        except OSError:
            continue
    return "(could not be written)"


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 a user mistake (one line says what and how to fix it), 1 an unexpected error (one
    line, with the file holding the traceback; --debug or SOFTPROMPT_DEBUG=1 shows it), 130 interrupted."""
    import os

    for stream in (sys.stdout, sys.stderr):  # a line at a time also into a pipe or a file
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SOFTPROMPT_DEBUG", "").lower() in ("1", "true", "yes")
    argv = [a for a in argv if a != "--debug"]  # anywhere on the line, before or after the command
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "extra", False):
            args.func(args, extra)
        else:
            args.func(args)
    except SoftPromptError as e:
        print(f"softprompt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("softprompt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:200]
        log = write_crash_log(args.command, e)
        print(f"softprompt {args.command}: unexpected error: {type(e).__name__}: {first} (full traceback in {log}; "
              "rerun with --debug to show it)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
