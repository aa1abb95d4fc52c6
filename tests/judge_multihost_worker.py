"""One process of the two-process judge stage in test_serve_multihost.py (run as a script, not collected).

The parent sets the standard JAX_* variables with PDPO_DISTRIBUTED=1 and two CPU devices per
process, and writes the run's test responses. Both processes run the pipeline's judge step with
`judge.serve` on the run's mesh over all four devices: process 0 serves the judge and judges
through it, process 1 follows its server. Each writes the results it returned to
`<out>/process_<i>.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax

from pdpo_jax import parallel
from pdpo_jax.config import load_config
from pdpo_jax.stages import PIPELINE_STEPS


def main(argv: list[str]) -> int:
    config_path, out, overrides = Path(argv[0]), Path(argv[1]), argv[2:]
    assert parallel.initialize_distributed(), "the environment should ask for a distributed run"
    results = PIPELINE_STEPS["judge"](load_config(config_path, overrides))
    (out / f"process_{jax.process_index()}.json").write_text(json.dumps(results))
    print(f"[process {jax.process_index()}] judged", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
