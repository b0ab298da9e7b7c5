"""The softprompt command line. Each subcommand is a plain function; user mistakes print one line, no traceback."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import SoftPromptError


def cmd_generate(args: argparse.Namespace) -> None:
    from .backbones import load_backbone
    from .files import load_prompt
    from .generation import generate

    texts = args.text or ([] if sys.stdin.isatty() else [line.rstrip("\n") for line in sys.stdin if line.strip()])
    if not texts:
        raise SoftPromptError("no input text; pass TEXT arguments or lines on stdin")
    bb = load_backbone(args.model, dtype=args.dtype, device=args.device)
    prompt = load_prompt(args.prompt, backbone=bb).build(bb.device) if args.prompt else None
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
    model = args.model or (bb_meta.get("name") if args.nearest else None)
    if args.nearest and model:
        import torch

        from .backbones import load_backbone
        from .files import check_prompt as check

        bb = load_backbone(model, device="cpu")
        check(pf, bb)
        emb = torch.nn.functional.normalize(bb.embedding_matrix.detach().float(), dim=-1)  # (V, H)
        prompt = torch.nn.functional.normalize(next(iter(pf.tensors.values())).float(), dim=-1)  # (P, H)
        sims = prompt @ emb.T  # (P, V) cosine similarity
        top = sims.topk(args.nearest, dim=-1)
        print(f"nearest vocabulary tokens (cosine), backbone {bb.name}:")
        for i, (vals, ids) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
            words = "  ".join(f"{bb.tokenizer.decode([t])!r}:{v:.2f}" for v, t in zip(vals, ids, strict=True))
            print(f"  {i:3d}  {words}")
    elif args.nearest:
        print("nearest tokens: the file names no backbone; pass --model")


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
    module = pf.build()
    if bb is not None and module.hidden_size != bb.hidden_size:
        raise SoftPromptError(f"PEFT prompt width {module.hidden_size} != backbone {bb.name!r} hidden size {bb.hidden_size}")
    path = save_prompt(args.out, module, bb, overwrite=args.force, extra={"imported_from": pf.metadata["imported_from"]})
    print(f"wrote {path} ({module.num_virtual_tokens} virtual tokens x {module.hidden_size})")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run

    run(model_name=args.model, steps=args.steps, n_test=args.n_test, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="softprompt", description="Prompt tuning for frozen pretrained models.")
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
    i.set_defaults(func=cmd_inspect)

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

    d = sub.add_parser("demo", help="the built-in demo: train a prompt on Rotten Tomatoes with SmolLM2-135M",
                       description="Train, evaluate against zero-shot, save and generate, on real data and a real model.")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--steps", type=int, default=60)
    d.add_argument("--n-test", type=int, default=200)
    d.add_argument("--out", default="runs/demo")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SoftPromptError as e:
        print(f"softprompt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("softprompt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
