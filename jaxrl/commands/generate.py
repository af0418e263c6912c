"""`jaxrl generate`: completions for one prompt or a file of prompts from an HF model directory."""

from __future__ import annotations

import json
import os

from jaxrl.errors import JaxrlError


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="HF model directory (with tokenizer)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="one prompt")
    source.add_argument("--prompts-file", metavar="FILE",
                        help="one prompt per line, or JSONL rows with a 'prompt' field")
    parser.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    parser.add_argument("--temperature", type=float, default=None, metavar="T",
                        help="sample at this temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B",
                        help="rows decoding together: the slot engine's slots, or the static sampler's batch")
    parser.add_argument("--engine", choices=("slots", "static"), default="slots",
                        help="slots: finished rows take the next prompt (jaxrl/rollout_engine.py); static: "
                             "each batch decodes until its longest completion ends")
    parser.add_argument("--output", metavar="FILE.jsonl", help="write {prompt, completion} rows here")


def run(args) -> int:
    sampling = _sampling(args)
    if not os.path.isdir(args.model):
        raise JaxrlError(f"model directory {args.model} does not exist (give an HF directory)")
    prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts_file)
    from jaxrl.train.build import load_tokenizer

    tokenizer = load_tokenizer(args.model, what="--model")
    if args.batch_size < 1:
        raise JaxrlError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.chat and not getattr(tokenizer, "chat_template", None):
        raise JaxrlError(f"--chat: the tokenizer in {args.model} has no chat_template; drop --chat")

    from jaxrl.models.hf import load_pretrained

    model = load_pretrained(args.model)
    ids = [encode(tokenizer, p, chat=args.chat) for p in prompts]
    common = dict(max_new_tokens=args.max_new_tokens, eos_ids=_eos_ids(model, tokenizer), seed=args.seed, **sampling)
    if args.engine == "slots":
        from jaxrl.rollout_engine import generate

        outputs = generate(model, ids, slots=args.batch_size, **common)
    else:
        from jaxrl.generation import generate

        outputs = generate(model, ids, batch_size=args.batch_size, **common)
    completions = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    if args.output:
        _write_jsonl(args.output, [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)])
        print(f"wrote {len(completions)} completions to {args.output}")
    else:
        for p, c in zip(prompts, completions):
            print(c if len(prompts) == 1 else f"### prompt\n{p}\n### completion\n{c}\n")
    return 0


def _sampling(args) -> dict:
    """--greedy, or --temperature/--top-p/--top-k; greedy when none is given."""
    chosen = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                ("top_k", args.top_k)) if v is not None}
    if args.greedy and chosen:
        raise JaxrlError("--greedy cannot be combined with --temperature/--top-p/--top-k")
    if ("top_p" in chosen or "top_k" in chosen) and "temperature" not in chosen:
        chosen["temperature"] = 1.0  # filtering only means something when sampling
    return chosen


def read_prompts(path: str) -> list[str]:
    """Prompts from a file: JSONL rows with a 'prompt' field when the first line is a JSON object,
    otherwise one prompt per non-empty line."""
    if not os.path.isfile(path):
        raise JaxrlError(f"prompts file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not lines:
        raise JaxrlError(f"prompts file {path} has no prompts")
    if not lines[0].lstrip().startswith("{"):
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise JaxrlError(f"{path}: non-empty line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise JaxrlError(f"{path}: non-empty line {n} has no string 'prompt' field")
        prompts.append(row["prompt"])
    return prompts



def encode(tokenizer, prompt: str, *, chat: bool) -> list[int]:
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    """The model config's EOS ids, plus the tokenizer's and generation_config.json's."""
    ids = list(model.config.eos_ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    gen_cfg = os.path.join(model.source_path, "generation_config.json")
    if os.path.exists(gen_cfg):
        from jaxrl.io import read_json

        eos = read_json(gen_cfg, what="generation config", fix="repair it or delete it (it is optional)"
                        ).get("eos_token_id")
        ids.extend(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return tuple(dict.fromkeys(int(i) for i in ids))


def _write_jsonl(path: str, rows: list[dict]) -> None:
    """Writes next to `path` and renames into place, so a failure leaves no half-written file."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
