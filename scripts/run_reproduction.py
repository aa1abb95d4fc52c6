"""The reproduction run: base, SFT, +PseudoDPO and +PseudoDPO w/o shuffle from one SFT model (and,
with --rl, the RL(DialogueNLI) baseline from it), with the learning rates searched on validation
(never on DNLI), DNLI on every listed subset, generated examples on test dialogues, and the
results table.

    python scripts/run_reproduction.py --config configs/experiments/personachat-cpu.yaml \\
        --data ../shared/data --root ../runs/personachat-cpu [--results results/personachat-cpu] \\
        [--rl configs/experiments/personachat-cpu-rl.yaml]

Every step is a `pdpo` command in its own process, in its own run directory under --root, and is
skipped when its output exists, so the run resumes where it stopped (a stage that was cut off
resumes from its own checkpoint). Under --root:

    sft-lr<LR>/          one SFT run per searched learning rate (best: lowest validation loss)
    main/                the chosen SFT (a copy), its pseudo-preferences, DPO, DNLI evaluations
    dpo-lr<LR>/          short DPO runs on main's pairs (best: highest validation reward accuracy)
    wo-shuffle/          negatives under the example's own persona, DPO with the chosen rate
    rl-dnli/             with --rl: the NLI classifier, PPO from main's SFT model, its DNLI evaluation
    eval/base/           the zero-shot base model's DNLI evaluation
    examples/            test conversations and the models' responses to them
    search.json, timings.json

The small reports (table, plots, search, timings, the stages' DONE records, the pairs'
summaries, and every model's DNLI report with its per-example records gzipped) are copied to --results.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pdpo_jax.run_layout import RunLayout

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDER = "PDPO_DATA"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="experiment config (configs/experiments/...)")
    parser.add_argument("--data", required=True, type=Path, help="folder holding personachat/ and dnli/")
    parser.add_argument("--root", required=True, type=Path, help="folder for every run directory (outside the repo)")
    parser.add_argument("--results", type=Path, help="where the small reports go (default: results/<config name>)")
    parser.add_argument("--sft-learning-rates", type=float, nargs="+", default=[2e-5, 5e-5, 1e-4])
    parser.add_argument("--dpo-learning-rates", type=float, nargs="+", default=[1e-6, 5e-6, 2e-5],
                        help="DPO rates searched; a single rate is used as it is, without a search run")
    parser.add_argument("--dpo-search-steps", type=int, default=90,
                        help="optimizer steps of each DPO search run (about a third of an epoch of the CPU run)")
    parser.add_argument("--test-turns", type=int, default=64,
                        help="test-dialogue turns every trained model answers (persona copying is counted over them)")
    parser.add_argument("--examples", type=int, default=12, help="how many of them examples.md shows")
    parser.add_argument("--rl", type=Path, metavar="CONFIG",
                        help="also the RL(DialogueNLI) baseline from the chosen SFT model: a config stacked on --config "
                             "with the nli and rl sections (e.g. configs/experiments/personachat-cpu-rl.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides given to every stage (e.g. a smoke run: data.max_dialogues=4)")
    return parser.parse_args(argv)


class Runner:
    def __init__(self, args: argparse.Namespace, config: Path):
        self.args, self.config, self.root = args, config, args.root.resolve()
        self.timings_path = self.root / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.exists() else {}

    def pdpo(self, name: str, *argv: str, cwd: Path = REPO) -> None:
        """`pdpo ARGV` (in `cwd`) as step `name`, its wall time added to timings.json."""
        print(f"== {name}: pdpo {' '.join(argv)}", flush=True)
        started = time.time()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}
        if subprocess.run([sys.executable, "-m", "pdpo_jax.cli", *argv], cwd=cwd, env=env).returncode:
            raise SystemExit(f"step {name!r} failed (its message is above); rerun to resume")
        self.timings[name] = round(self.timings.get(name, 0.0) + time.time() - started, 1)
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json(self.timings_path, self.timings)

    def stage(self, name: str, run_dir: Path, stage: str, *overrides: str, extra: tuple[str, ...] = ()) -> None:
        self.pdpo(name, stage, "--config", str(self.config), *extra, f"run_dir={run_dir}", *self.args.overrides,
                  *overrides)


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _done(run: RunLayout, stage: str) -> dict | None:
    done = run.done(stage)
    return json.loads(done.read_text()) if done.exists() else None


def _link(source: Path, target: Path) -> None:
    """`target` names the finished stage folder `source` (a symlink: the runs that share it only
    read it, and an SFT folder holds gigabytes of checkpoints)."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source.resolve(), target_is_directory=True)


def _searched(rates: list[float]) -> list[float]:
    """The rates a search compares: one rate given is used as it is, with no search run."""
    return rates if len(rates) > 1 else []


def relative_paths(value, folders: dict[Path, str]):
    """`value` (parsed JSON) with every string naming a path under one of `folders` rewritten as
    that folder's name for it plus the rest of the path (the run root: "" for a path relative to
    it; the data folder: PDPO_DATA, as the configs write it), so a committed report names no
    machine's folders."""
    if isinstance(value, dict):
        return {key: relative_paths(item, folders) for key, item in value.items()}
    if isinstance(value, list):
        return [relative_paths(item, folders) for item in value]
    if isinstance(value, str) and os.path.isabs(value):
        path = Path(os.path.normpath(value))
        for folder, name in folders.items():
            if path == folder or folder in path.parents:
                return os.path.normpath(Path(name) / path.relative_to(folder))
    return value


def keep_json(source: Path, target: Path, root: Path, data: Path) -> None:
    """A run's JSON record copied into the committed results, its paths relative to the run root
    and the data folder, and the bundled model's cached copy named `default` (as --model takes it)."""
    from pdpo_jax.cache_root import default_cache_root
    from pdpo_jax.model.default_model import DEFAULT_MODEL_NAME

    folders = {Path(os.path.abspath(root)): "", Path(os.path.abspath(data)): PLACEHOLDER,
               default_cache_root() / DEFAULT_MODEL_NAME: "default"}
    _write_json(target, relative_paths(json.loads(source.read_text()), folders))


def keep_dnli_records(reports: dict[str, Path], out: Path, root: Path, data: Path) -> None:
    """Every model's DNLI report and its per-example records, gzipped, in out/<model>/ (gunzip
    them, and `pdpo results` recomputes the table from the repository)."""
    from pdpo_jax.evaluate.dnli import output_paths
    from pdpo_jax.storage import atomic_write_bytes

    for name, report in reports.items():
        kept = out / name
        kept.mkdir(parents=True, exist_ok=True)
        keep_json(report, kept / report.name, root, data)
        sidecar = output_paths(report)["examples"]
        atomic_write_bytes(kept / f"{sidecar.name}.gz", gzip.compress(sidecar.read_bytes(), mtime=0))


def _rate(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-")


def resolved_configs(data: Path, tmp: Path, *also: Path) -> None:
    """Every experiment config (and `also`) with PDPO_DATA replaced, side by side so `base:` files resolve."""
    for source in (*(REPO / "configs" / "experiments").glob("*.yaml"), *also):
        (tmp / source.name).write_text(source.read_text().replace(PLACEHOLDER, str(data.resolve())))


def write_test_conversations(config: Path, overrides: list[str], out: Path, count: int) -> None:
    """`count` model turns of the test dialogues (seeded pick), as `pdpo generate --input` reads them."""
    from pdpo_jax.config import load_config
    from pdpo_jax.data.corpus import pick_test_turns, prepare_corpus

    run = load_config([str(config)], overrides)
    picked = pick_test_turns(prepare_corpus(run.data, run.seed), count, run.seed)
    if not picked:
        raise SystemExit(f"{config}: the corpus has no test dialogues (set data.test_fraction)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"id": e.id, "persona": list(e.persona), "history": list(e.history),
                                       "reference": e.response}) + "\n" for e in picked))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    results = (args.results or REPO / "results" / args.config.stem).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        resolved_configs(args.data, Path(tmp), *([args.rl] if args.rl else []))
        runner = Runner(args, Path(tmp) / args.config.name)
        root = runner.root
        search = {"sft": {}, "dpo": {}, "dpo_search_steps": args.dpo_search_steps,
                  "selection": "SFT: lowest validation loss; DPO: highest validation reward accuracy"}

        # 1. SFT learning rate, on validation loss
        sft_runs = {lr: RunLayout(root / f"sft-lr{_rate(lr)}") for lr in args.sft_learning_rates}
        for lr, run in sft_runs.items():
            if _done(run, "sft") is None:
                runner.stage(f"sft lr={lr:g}", run.root, "sft", f"sft.optimizer.learning_rate={lr}")
            info = _done(run, "sft")
            search["sft"][f"{lr:g}"] = {"best_val_loss": info["best_value"], "best_step": info["best_step"]}
        sft_lr = min(args.sft_learning_rates, key=lambda lr: search["sft"][f"{lr:g}"]["best_val_loss"])
        search["sft_learning_rate"] = sft_lr
        main = RunLayout(root / "main")
        _link(sft_runs[sft_lr].stage("sft"), main.stage("sft"))
        _write_json(root / "search.json", search)

        # 2. the zero-shot base and the SFT model on DNLI; pseudo-preferences from the SFT model
        base_report = RunLayout(root).dnli_report("base")
        if not base_report.exists():
            runner.pdpo("eval-dnli base", "eval-dnli", "--config", str(runner.config), "--model", "default",
                        "--name", "BASE", "--out", str(base_report), *args.overrides)
        runner.stage("eval-dnli sft", main.root, "pipeline", extra=("--stages", "eval-sft"))
        runner.stage("make-prefs", main.root, "make-prefs")

        # 3. DPO learning rate, on validation reward accuracy, in short runs on main's pairs
        dpo_runs = {lr: RunLayout(root / f"dpo-lr{_rate(lr)}") for lr in _searched(args.dpo_learning_rates)}
        for lr, run in dpo_runs.items():
            _link(main.stage("sft"), run.stage("sft"))
            _link(main.prefs, run.prefs)
            if _done(run, "dpo") is None:
                runner.stage(f"dpo search lr={lr:g}", run.root, "dpo", f"dpo.optimizer.learning_rate={lr}",
                             f"dpo.max_steps={args.dpo_search_steps}")
            info = _done(run, "dpo")
            search["dpo"][f"{lr:g}"] = {"best_val_reward_accuracy": info["best_value"], "best_step": info["best_step"]}
        dpo_lr = max(_searched(args.dpo_learning_rates),
                     key=lambda lr: search["dpo"][f"{lr:g}"]["best_val_reward_accuracy"], default=args.dpo_learning_rates[0])
        search["dpo_learning_rate"] = dpo_lr
        _write_json(root / "search.json", search)

        # 4. PseudoDPO, and the w/o-shuffle ablation from the same SFT model
        dpo_lr_override = f"dpo.optimizer.learning_rate={dpo_lr}"
        runner.stage("dpo", main.root, "pipeline", dpo_lr_override, extra=("--stages", "dpo,eval-dpo"))
        wo = RunLayout(root / "wo-shuffle")
        _link(main.stage("sft"), wo.stage("sft"))
        runner.stage("wo-shuffle", wo.root, "pipeline", "prefs.shuffle=false", dpo_lr_override,
                     extra=("--stages", "make-prefs,dpo,eval-dpo"))

        # 5. with --rl, the RL(DialogueNLI) baseline from the same SFT model
        rl = RunLayout(root / "rl-dnli")
        if args.rl:
            _link(main.stage("sft"), rl.stage("sft"))
            for name, stage in (("train-nli", "train-nli"), ("rl", "rl"), ("eval-dnli rl", "eval-rl")):
                runner.stage(name, rl.root, "pipeline", extra=("--config", str(Path(tmp) / args.rl.name), "--stages", stage))

        # 6. generated examples on test dialogues
        conversations = root / "examples" / "test_conversations.jsonl"
        if not conversations.exists():
            write_test_conversations(runner.config, args.overrides, conversations, args.test_turns)
        answering = {"sft": main.best_model("sft"), "pseudo-dpo": main.best_model("dpo"),
                     **({"rl": rl.best_model("rl")} if args.rl else {})}
        for name, model in answering.items():
            out = root / "examples" / f"{name}.jsonl"
            if not out.exists():
                runner.pdpo(f"generate {name}", "generate", "--model", str(model), "--input", str(conversations),
                            "--output", str(out), "--sampler", "greedy", "--max-new-tokens", "32")

        # 7. the small reports: the table, its plots, generated examples, search and timings
        reports = {"base": base_report, "sft": main.dnli_report("sft"), "pseudo-dpo": main.dnli_report("dpo"),
                   "wo-shuffle": wo.dnli_report("dpo"), **({"rl": rl.dnli_report("rl")} if args.rl else {})}
        columns = {"SFT": "sft", "PseudoDPO": "pseudo-dpo", **({"RL(DialogueNLI)": "rl"} if args.rl else {})}
        curves = {"sft": main.metrics("sft"), "pseudo-dpo": main.metrics("dpo"), "wo-shuffle": wo.metrics("dpo"),
                  **{f"sft-lr{_rate(lr)}": sft_runs[lr].metrics("sft") for lr in _searched(args.sft_learning_rates)},
                  **{f"dpo-lr{_rate(lr)}": run.metrics("dpo") for lr, run in dpo_runs.items()}}
        runner.pdpo("results", "results", "--out", str(results), "--reference", "sft",
                    *[f"--model={name}={path}" for name, path in reports.items()],
                    *[f"--curves={name}={path}" for name, path in curves.items()],
                    *([f"--ppo-curves=rl={rl.metrics('rl')}"] if args.rl else []),
                    "--conversations", str(conversations),
                    *[f"--responses={column}={root / 'examples' / f'{name}.jsonl'}" for column, name in columns.items()],
                    "--examples", str(args.examples))
    results.mkdir(parents=True, exist_ok=True)
    for name in ("search.json", "timings.json"):
        keep_json(root / name, results / name, root, args.data)
    # the stages' DONE records (best steps, the DPO step-0 check, truncated negatives) and the pairs' summaries
    records = {"sft-done.json": main.done("sft"), "dpo-done.json": main.done("dpo"),
               "prefs-summary.json": main.prefs_summary,
               "wo-shuffle-dpo-done.json": wo.done("dpo"),
               "wo-shuffle-prefs-summary.json": wo.prefs_summary,
               **({"rl-dnli-nli-done.json": rl.done("nli"), "rl-dnli-rl-done.json": rl.done("rl")} if args.rl else {})}
    for name, source in records.items():
        keep_json(source, results / name, root, args.data)
    keep_dnli_records(reports, results / "dnli", root, args.data)
    print(f"runs in {root}; reports in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
