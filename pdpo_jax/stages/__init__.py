"""The stages of the method, one module each, in the order a run goes through them.

    default_model   the bundled SmolLM2-135M-Instruct as a Hugging Face directory
    data            fetch the public data sets; inspect a data file
    sft             1. supervised fine-tuning on persona dialogues
    make_prefs      2. pseudo-negatives sampled under another dialogue's persona
    dpo             3. DPO from the SFT model on those pairs
    train_nli       the RL(DialogueNLI) baseline: an NLI classifier on Dialogue NLI pairs
    rl              the RL(DialogueNLI) baseline: PPO from the SFT model against the classifier's reward
    eval_nli        the classifier's accuracy on labelled pairs
    eval_dnli       4. Dialogue-NLI candidate ranking
    test_responses  4. every trained model's responses to the test dialogues' turns
    judge           4. pairwise LLM-as-judge win rates
    annotate        4. a human study of the same pairs: the annotation web application and its report
    export_hf       4. any trained model as a Hugging Face directory
    results         4. the results table of several evaluated models, and responses side by side
    generate        talk to a model: persona + history in, response out
    pipeline        1-4 in one run directory
    plan            compile a config's programs for its TPU slice: does it fit, how long an epoch takes

Each module has `main(argv) -> int` and raises, rather than prints, what goes wrong. The
libraries they stand on are below them: `data`, `model`, `scoring`, `generation`, `train`,
`evaluate`.
"""

from __future__ import annotations

# `pdpo <name>` -> (module, one-line description), in the order of the method.
STAGES: dict[str, tuple[str, str]] = {
    "default-model": ("pdpo_jax.stages.default_model", "materialize the bundled SmolLM2-135M-Instruct as a Hugging Face directory"),
    "data": ("pdpo_jax.stages.data", "fetch and verify the public data sets; inspect a data file"),
    "sft": ("pdpo_jax.stages.sft", "1. supervised fine-tuning on persona dialogues"),
    "make-prefs": ("pdpo_jax.stages.make_prefs", "2. build pseudo-preference pairs with swapped personas"),
    "dpo": ("pdpo_jax.stages.dpo", "3. DPO from the SFT model on pseudo-preference pairs"),
    "train-nli": ("pdpo_jax.stages.train_nli", "baseline: a 3-way NLI classifier on Dialogue NLI pairs (the RL reward)"),
    "rl": ("pdpo_jax.stages.rl", "baseline RL(DialogueNLI): PPO from the SFT model against the NLI reward"),
    "eval-nli": ("pdpo_jax.stages.eval_nli", "an NLI classifier's accuracy per class on labelled pairs (JSON)"),
    "eval-dnli": ("pdpo_jax.stages.eval_dnli", "4. Dialogue-NLI candidate ranking by log-likelihood"),
    "test-responses": ("pdpo_jax.stages.test_responses", "4. every trained model's responses to the test turns"),
    "judge": ("pdpo_jax.stages.judge", "4. pairwise LLM-as-judge win rates"),
    "annotate": ("pdpo_jax.stages.annotate", "4. pairwise human evaluation: items, annotator links, web app, votes, report"),
    "export-hf": ("pdpo_jax.stages.export_hf", "4. export a checkpoint to a Hugging Face directory"),
    "results": ("pdpo_jax.stages.results", "4. DNLI table with intervals and paired tests; responses side by side"),
    "generate": ("pdpo_jax.stages.generate", "persona + history in, response out"),
    "pipeline": ("pdpo_jax.stages.pipeline", "1-4 in order inside one run directory"),
    "plan": ("pdpo_jax.stages.plan", "compile a config for its TPU slice: per-chip memory, FLOPs, epoch times"),
}
