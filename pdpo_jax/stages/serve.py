"""`pdpo serve`: a model behind an OpenAI-compatible HTTP endpoint, with continuous batching.

    pdpo serve --model default
    pdpo serve --model runs/demo/dpo/best --slots 16 --max-model-len 1024 --port 8001
    pdpo serve --model Qwen/Qwen2-72B-Instruct --mesh fsdp=8 --api-key-env JUDGE_KEY --host 0.0.0.0
    pdpo serve --config configs/paper/llama-2-7b.yaml model.path=runs/llama/dpo/best --slots 32

Any OpenAI client talks to it (`base_url="http://127.0.0.1:8000/v1"`, model = the served name
that /v1/models lists). The pieces live in `pdpo_jax.serve`; docs/serve.md has the details.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import jax

from pdpo_jax.data.templates import PRESETS, load_template
from pdpo_jax.errors import UsageError
from pdpo_jax.model import load_model
from pdpo_jax.parallel import initialize_distributed, is_primary, make_mesh
from pdpo_jax.serve.server import (
    DEFAULT_HOST,
    DEFAULT_PROMPT_CACHE_MIB,
    DEFAULT_MAX_MODEL_LEN,
    DEFAULT_PORT,
    DEFAULT_SLOTS,
    WAITING_PER_SLOT,
    ServeOptions,
    api_key_from_env,
    build_service,
    follow_leader,
    serve_forever,
)
from pdpo_jax.stage_runner import StageParser, config_from_args, model_load_options, parse_mesh, stage_parser

PROG = "pdpo serve"
EPILOG = """\
endpoints: POST /v1/chat/completions (stream: true for server-sent events), POST /v1/completions,
  GET /v1/models, GET /health. Parameters: max_tokens, temperature (0 = greedy), top_p, seed,
  stop, n, logprobs / top_logprobs (at most 5).

prompts: chat messages go through the tokenizer's chat template, --chat-template FILE.jinja, or
  a persona template (--template chat-en|plain-en|...|FILE.yaml, for a model trained with it): the
  system message is the persona, one fact per line, then the dialogue, ending with a user line.

shapes: a step runs the busy slots (rounded up to a power of two, at most --slots) over a power of
  two of cache columns (at least 64); until that shape is compiled (in the background) it runs at a
  compiled larger one. A prompt is prefilled at its bucketed width (16, 32, ..., 128, then 4 per
  octave), one compile per width. --warm-up compiles them all from the start.

a run config (--config FILE ... KEY=VALUE) gives the model (model.path, model.dtype,
  model.scan_layers, model.allow_pickle) and the mesh (mesh.data/fsdp/tensor); --model, --dtype and
  --mesh win over it. Without one: the bundled model, float32, one device.

Ctrl-C stops taking requests (503), lets those in flight finish for --drain-seconds, cancels the rest.

several hosts: start the same command on every host of the slice (as tpu/launch.sh does); process 0
  answers HTTP, the others run its steps over the shared mesh and stop when it stops."""


def build_parser() -> StageParser:
    parser = stage_parser(PROG, "Serve a model over OpenAI's chat and completions API, batching requests "
                          "continuously over a fixed number of KV-cache slots.", config="optional", epilog=EPILOG,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (Hugging Face or a stage's best/), a Hub "
                        "id, or `default` for the bundled SmolLM2-135M-Instruct (default: --config's model.path, "
                        "else default)")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (default: %(default)s, this "
                        "machine only; anything else is reachable from the network, unencrypted)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s; 0 = any free port)")
    parser.add_argument("--slots", type=int, default=DEFAULT_SLOTS,
                        help="requests decoded together, each with its own KV cache (default: %(default)s)")
    parser.add_argument("--max-model-len", type=int, default=None, metavar="TOKENS",
                        help=f"prompt + response tokens per request (default: {DEFAULT_MAX_MODEL_LEN} or the "
                             "model's positions if fewer)")
    parser.add_argument("--max-waiting", type=int, default=None, metavar="N",
                        help=f"requests queued for a slot before new ones get 429 (default: {WAITING_PER_SLOT} x slots)")
    parser.add_argument("--prompt-cache-mib", type=int, default=DEFAULT_PROMPT_CACHE_MIB, metavar="MIB",
                        help="prefilled prompts kept so that the same prompt again skips its prefill (n > 1 "
                             "choices, retries), least recently used dropped first; 0 keeps none "
                             "(default: %(default)s)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the model name clients send (default: the model directory's name)")
    parser.add_argument("--chat-template", type=Path, default=None, metavar="FILE.jinja",
                        help="a Jinja chat template to use instead of the tokenizer's")
    parser.add_argument("--template", default=None, metavar="NAME|FILE.yaml",
                        help="a persona template (%s, or a YAML file) instead of a chat template: the system "
                             "message is the persona, one fact per line, and the prompt is built as training "
                             "and `pdpo generate --template` build it (for a model trained with it)"
                             % ", ".join(PRESETS))
    parser.add_argument("--api-key-env", default=None, metavar="VAR",
                        help="require `Authorization: Bearer <key>` with the key in this environment variable")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: --config's model.dtype, else float32)")
    parser.add_argument("--mesh", default=None, help="data=N,fsdp=N,tensor=N to shard the model and the slots over "
                        "the devices, or none: one device (default: --config's mesh, else none)")
    parser.add_argument("--warm-up", action="store_true",
                        help="compile every step shape and prompt width from the start, in the background "
                             "(GET /health counts what is left); otherwise each compiles when first needed")
    parser.add_argument("--drain-seconds", type=float, default=10.0,
                        help="on shutdown, how long requests in flight may take to finish (default: %(default)s)")
    return parser


def model_settings(args: argparse.Namespace) -> tuple[str, dict[str, Any], dict[str, int] | None]:
    """(the model to load, `load_model`'s options, the mesh's sizes or None for one device): the
    flags over the run config's `model` and `mesh` sections."""
    path, options, mesh = "default", {"compute_dtype": "float32"}, None
    config = config_from_args(args)
    if config is not None:
        path = config.model.path
        options = model_load_options(config)
        mesh = {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor}
    if args.dtype is not None:
        options["compute_dtype"] = args.dtype
    if args.mesh is not None:
        mesh = parse_mesh(args.mesh)
    return args.model or path, options, mesh


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.slots < 1 or (args.max_waiting is not None and args.max_waiting < 0) or args.prompt_cache_mib < 0:
        raise UsageError("--slots must be >= 1, --max-waiting and --prompt-cache-mib >= 0")
    if not 0 <= args.port < 2**16:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    if args.template is not None:
        if args.chat_template is not None:
            raise UsageError("--template and --chat-template are two ways to render messages: give one")
        load_template(args.template)  # a bad name or file fails before the model loads
    chat_template = None
    if args.chat_template is not None:
        chat_template = args.chat_template.read_text(encoding="utf-8")
    api_key = api_key_from_env(args.api_key_env)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    model_path, load_options, mesh_sizes = model_settings(args)
    initialize_distributed()
    mesh = make_mesh(**mesh_sizes) if mesh_sizes is not None else None
    if mesh is None and jax.process_count() > 1:
        raise UsageError(f"{jax.process_count()} processes serve one model over one mesh: give --mesh")
    model = load_model(model_path, mesh=mesh, **load_options)
    options = ServeOptions(slots=args.slots, max_model_len=args.max_model_len, max_waiting=args.max_waiting,
                           api_key=api_key, served_name=args.served_model_name, chat_template=chat_template,
                           persona_template=args.template,
                           drain_seconds=args.drain_seconds, warm_up=args.warm_up,
                           prompt_cache_mib=args.prompt_cache_mib)
    if not is_primary():  # a multi-host mesh: process 0 serves, this one runs its steps
        follow_leader(model, options, mesh)
        return 0
    service = build_service(model, options, mesh)
    serve_forever(service, args.host, args.port, drain_seconds=args.drain_seconds,
                  announce=lambda line: print(line, flush=True))
    return 0
