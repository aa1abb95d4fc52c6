"""`pdpo generate`: persona + history in, response out; the quick way to talk to a model.

    pdpo generate --model default --persona "i love cats." "i live in paris." --history "hi! any pets?"
    pdpo generate --model runs/demo/dpo/best --input talks.jsonl --output replies.jsonl --sampler top_p

`--input` reads JSON lines `{"persona": [...], "history": [...]}` (an optional "id" is copied to
the output); each output line adds "response" and "stopped" (false when the token budget ran out).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pdpo_jax.data import PromptEncoder
from pdpo_jax.errors import PdpoError, UsageError
from pdpo_jax.storage import atomic_write_jsonl, jsonl_objects
from pdpo_jax.generation import respond_to_conversations, sampler_from_config
from pdpo_jax.model import Model, load_model, require_tokenizer
from pdpo_jax.parallel import initialize_distributed, is_primary, make_mesh
from pdpo_jax.stage_runner import StageParser, parse_mesh, stage_parser

SAMPLERS = ("greedy", "temperature", "top_k", "top_p")


class InputError(PdpoError):
    """A conversation that cannot be answered; the message names the file and line."""


def build_parser() -> StageParser:
    parser = stage_parser(
        "pdpo generate",
        config="none",
        epilog=None,
        description="Answer a partner's last line in character: persona sentences and the history (oldest first, "
                    "ending with the partner's line; empty when the model speaks first) in, a response out.",
    )
    parser.add_argument("--model", default="default", help="model directory (Hugging Face or a stage's best/), or "
                        "`default` for the bundled SmolLM2-135M-Instruct (default: %(default)s)")
    parser.add_argument("--persona", action="extend", nargs="+", default=[], metavar="SENTENCE",
                        help="persona sentences of the model's character")
    parser.add_argument("--history", action="extend", nargs="+", default=[], metavar="UTTERANCE",
                        help="earlier utterances, oldest first, the last one the partner's")
    parser.add_argument("--input", type=Path, metavar="FILE.jsonl", help="conversations, one JSON object per line")
    parser.add_argument("--output", type=Path, metavar="FILE.jsonl", help="write JSON lines here instead of printing")
    parser.add_argument("--template", default="chat-en", help="prompt template preset or YAML file (default: %(default)s)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="greedy", help="decoding (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-length", type=int, default=None,
                        help="prompt + response token limit; the oldest history turns go first (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8, help="conversations sampled together with --input")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    parser.add_argument("--mesh", default="none", help="data=N,fsdp=N,tensor=N to load and sample on a device mesh "
                        "(a model too big for one device; every host of a pod runs the same command), or none "
                        "(the default: one device)")
    return parser


def read_conversations(path: Path) -> list[dict[str, Any]]:
    conversations = []
    for where, item in jsonl_objects(path, InputError):
        for key in ("persona", "history"):
            value = item.get(key, [] if key == "history" else None)
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise InputError(f"{where}: {key!r} must be a list of strings")
            item[key] = value
        if not item["persona"]:
            raise InputError(f"{where}: 'persona' is empty")
        conversations.append(item)
    if not conversations:
        raise InputError(f"{path}: no conversations")
    return conversations


def answer(model: Model, conversations: list[dict[str, Any]], args: argparse.Namespace,
           mesh: Any = None) -> list[dict[str, Any]]:
    encoder = PromptEncoder(model.tokenizer, args.template)
    sampler = sampler_from_config(args.sampler, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    answered = respond_to_conversations(
        model, encoder, [(item["persona"], item["history"]) for item in conversations],
        max_new_tokens=args.max_new_tokens, sampler=sampler, seed=args.seed, batch_size=args.batch_size,
        max_length=args.max_length, mesh=mesh)
    return [{**item, "response": response.text, "stopped": response.stopped}
            for item, (response, _) in zip(conversations, answered)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.input is not None and (args.persona or args.history):
        raise UsageError("give either --input or --persona/--history, not both")
    if args.input is None and not args.persona:
        raise UsageError("give --persona (and --history), or --input FILE.jsonl")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise UsageError("--max-new-tokens and --batch-size must be positive")
    conversations = (read_conversations(args.input) if args.input is not None
                     else [{"persona": args.persona, "history": args.history}])
    mesh_sizes = parse_mesh(args.mesh)
    initialize_distributed()  # before any other JAX call; a no-op on one machine
    mesh = make_mesh(**mesh_sizes) if mesh_sizes is not None else None
    model = load_model(args.model, compute_dtype=args.dtype, mesh=mesh)
    require_tokenizer(model)
    results = answer(model, conversations, args, mesh)
    if not is_primary():
        return 0
    if args.output is not None:
        atomic_write_jsonl(args.output, results)
    elif args.input is not None:
        for result in results:
            print(json.dumps(result, ensure_ascii=False))
    else:
        print(results[0]["response"])
    return 0
