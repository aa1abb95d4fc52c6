"""The `pdpo` command: parses the stage name and hands the rest of the arguments to that stage.

Each stage lives in its own module and exposes `main(argv) -> int`; this file only knows where.
Modules are imported lazily so `pdpo --help` stays fast and a stage's heavy imports (JAX, torch)
are paid only by the stage that needs them.
"""

from __future__ import annotations

import importlib
import sys

# stage name -> ("module", "one-line description")
STAGES: dict[str, tuple[str, str]] = {
    "default-model": ("pdpo_jax.model.default_model", "materialize the bundled SmolLM2-135M-Instruct as a Hugging Face directory"),
    "sft": ("pdpo_jax.train.sft", "supervised fine-tuning on persona dialogues"),
    "make-prefs": ("pdpo_jax.prefs", "build pseudo-preference pairs with swapped personas"),
    "dpo": ("pdpo_jax.train.dpo", "DPO from the SFT model on pseudo-preference pairs"),
    "eval-dnli": ("pdpo_jax.evaluate.dnli", "Dialogue-NLI candidate ranking by log-likelihood"),
    "judge": ("pdpo_jax.evaluate.judge", "pairwise LLM-as-judge win rates"),
    "export-hf": ("pdpo_jax.model.export", "export a checkpoint to a Hugging Face directory"),
    "generate": ("pdpo_jax.generate_cli", "persona + history in, response out"),
    "pipeline": ("pdpo_jax.pipeline", "all stages in order inside one run directory"),
    "data": ("pdpo_jax.data.download", "fetch and verify the public data sets"),
}


def _usage() -> str:
    width = max(len(name) for name in STAGES)
    lines = ["usage: pdpo <stage> [--help] [options]", "", "stages:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in STAGES.items()]
    lines += ["", "Run `pdpo <stage> --help` for what a stage needs."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"pdpo: unknown stage {stage!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = STAGES[stage]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("pdpo_jax"):
            print(f"pdpo: stage {stage!r} is not available in this version ({err.name} missing)", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
