"""The package's layers point one way: a module imports only from layers below its own, or from its
own component. The order is declared once, here; docs/design.md shows it.

Components of one layer are independent of each other (`train` never imports `evaluate`, `data`
never imports `model`), and project modules are imported at module level, so a module's
dependencies are visible at its top.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path


PACKAGE_DIR = Path(__file__).resolve().parents[1] / "pdpo_jax"

# Bottom to top. Each entry of a layer is a component: a module or a subpackage of pdpo_jax.
LAYERS: tuple[tuple[str, ...], ...] = (
    # the base of every user-facing error | glibc's huge pages, asked before a command runs | the cache folder
    ("errors", "huge_pages", "cache_root"),
    # gs:// paths beside local ones, and the object operations commits and the lock need | the HTTP servers' socket
    ("object_store", "listening"),
    ("storage", "config", "run_lock"),  # writing, reading and committing files | run configuration | one run per run dir
    # the projection | which form a hot operation takes per backend | mesh and partition rules | metrics.jsonl
    # | where every artifact of a run lives
    ("projection", "backend_forms", "parallel", "metrics_log", "run_layout"),
    ("objectives",),  # pure loss math: SFT, the preference objectives, NLI classification, PPO
    ("data", "model"),  # readers, templates, batching | the decoder, loading, export
    ("scoring", "generation", "nli"),  # scoring sequences | sampling and decoding | NLI probabilities and reward
    # training loop | DNLI, judge, reports | the root API's one-call helpers | building, scoring and
    # reading preference records
    ("train", "evaluate", "conveniences", "prefs"),
    # a config's programs compiled for a TPU slice | a human study of the judge's pairs (stands on
    # evaluate) | PPO (planning and rl stand on train, generation, scoring)
    ("planning", "annotation", "rl", "serve"),  # ... | an OpenAI-compatible server on the decoder (stands on generation)
    ("stage_runner",),  # what every stage shares: parser, config, lock, mesh, the DONE -> work -> DONE sequence
    ("stages",),  # one module per stage of the method, declared once in stages/__init__.py
    ("cli", "__init__"),  # entry points
)


def component_of(module: str) -> str:
    """'pdpo_jax.data.batching' -> 'data'; 'pdpo_jax' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


LAYER_OF = {component: index for index, layer in enumerate(LAYERS) for component in layer}


def module_name(path: Path, package_dir: Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(tree: ast.Module, module: str, is_package: bool):
    """(imported module, line, at module level?) for every import of a pdpo_jax module."""
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                names = [".".join(base + ([node.module] if node.module else []))]
            elif node.module:
                names = [node.module]
                if node.module == "pdpo_jax":  # `from pdpo_jax import parallel` names a module
                    names = [f"pdpo_jax.{alias.name}" for alias in node.names]
        for name in names:
            if name == "pdpo_jax" or name.startswith("pdpo_jax."):
                yield name, node.lineno, id(node) in top_level or _in_type_checking(tree, node)


def _in_type_checking(tree: ast.Module, target: ast.AST) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            if any(child is target for child in ast.walk(node)):
                return True
    return False


def layer_violations(package_dir: Path = PACKAGE_DIR) -> list[str]:
    problems = []
    for path in sorted(package_dir.rglob("*.py")):
        module = module_name(path, package_dir)
        own = component_of(module)
        if own not in LAYER_OF:
            problems.append(f"{path}: component {own!r} is in no layer; add it to LAYERS")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for imported, line, at_top in project_imports(tree, module, path.name == "__init__.py"):
            where = f"{path.relative_to(package_dir.parent)}:{line}"
            if not at_top:
                problems.append(f"{where}: imports {imported} inside a function; import project modules at the top")
            target = component_of(imported)
            if target == own or imported == "pdpo_jax":
                continue
            if target not in LAYER_OF:
                problems.append(f"{where}: imports {imported}, which is in no layer")
            elif LAYER_OF[target] >= LAYER_OF[own]:
                relation = "its own layer" if LAYER_OF[target] == LAYER_OF[own] else "a higher layer"
                problems.append(f"{where}: {module} ({own}, layer {LAYER_OF[own]}) imports {imported} "
                                f"({target}, {relation} {LAYER_OF[target]})")
    return problems


def stage_to_stage_imports(package_dir: Path = PACKAGE_DIR) -> list[str]:
    """Imports of one stage module by another (or by the registry, `stages/__init__.py`, which
    names modules without importing them). What stages share lives below them."""
    stages_dir = package_dir / "stages"
    stage_modules = {f"pdpo_jax.stages.{path.stem}" for path in stages_dir.glob("*.py") if path.stem != "__init__"}
    problems = []
    for path in sorted(stages_dir.glob("*.py")):
        module = module_name(path, package_dir)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import module`
            for name in names:
                hit = next((m for m in stage_modules if name == m or name.startswith(m + ".")), None)
                if hit is not None and hit != module:
                    problems.append(f"{path.relative_to(package_dir.parent)}:{node.lineno}: {module} imports "
                                    f"the stage module {hit}; move what they share below the stages")
                    break
    return problems


def test_no_stage_module_imports_another():
    assert stage_to_stage_imports() == []


def test_a_stage_importing_a_stage_is_caught(tmp_path):
    package = tmp_path / "pdpo_jax"
    for name, text in {
        "__init__.py": "",
        "stage_runner.py": "",
        "stages/__init__.py": "",
        "stages/sft.py": "from pdpo_jax.stage_runner import run_once\n",  # infrastructure: fine
        "stages/dpo.py": "from pdpo_jax.stages.sft import run_sft\n",
        "stages/rl.py": "from . import sft\n",
        "stages/judge.py": "from pdpo_jax.stages import dpo\n",
        "stages/pipeline.py": "from pdpo_jax.stages import PIPELINE_STEPS\n",  # the registry: fine
    }.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    problems = stage_to_stage_imports(package)
    assert len(problems) == 3, problems
    assert [p.split(":")[0] for p in problems] == [
        "pdpo_jax/stages/dpo.py", "pdpo_jax/stages/judge.py", "pdpo_jax/stages/rl.py"]


def test_imports_point_down_the_layers():
    assert layer_violations() == []


def test_every_component_is_in_a_layer_and_exists():
    on_disk = {p.stem for p in PACKAGE_DIR.glob("*.py")} | {p.name for p in PACKAGE_DIR.iterdir()
                                                             if (p / "__init__.py").is_file()}
    declared = set(LAYER_OF)
    assert on_disk == declared, (sorted(on_disk - declared), sorted(declared - on_disk))


def test_an_upward_import_is_caught(tmp_path):
    package = tmp_path / "pdpo_jax"
    for name, text in {
        "__init__.py": "",
        "objectives.py": "from pdpo_jax.train.steps import train_step\n",  # math importing training: upward
        "data/__init__.py": "",
        "data/batching.py": "def f():\n    from pdpo_jax.data import templates\n",  # function-level
        "train/__init__.py": "",
        "train/steps.py": "from pdpo_jax.evaluate import report\n",  # a sibling component of its layer
        "evaluate/__init__.py": "",
        "evaluate/report.py": "from ..model import load_model\n",  # relative, downward: fine
        "model/__init__.py": "",
    }.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(textwrap.dedent(text))
    problems = layer_violations(package)
    assert len(problems) == 3, problems
    upward, function_level, sibling = (next(p for p in problems if p.startswith(f"pdpo_jax/{name}"))
                                       for name in ("objectives.py:1", "data/batching.py:2", "train/steps.py:1"))
    assert "a higher layer" in upward
    assert "inside a function" in function_level
    assert "its own layer" in sibling


def test_the_package_root_and_the_command_import_no_jax(subprocess_env):
    """`import pdpo_jax` and `pdpo --help` stay fast: the public names load on first use."""
    code = "import sys, pdpo_jax, pdpo_jax.cli; print('jax' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], env=subprocess_env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
