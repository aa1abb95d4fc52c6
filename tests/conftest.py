"""Shared test set-up.

Eight fake CPU devices are requested before JAX is imported anywhere, so sharding tests can build
meshes; single-device code simply runs on the first one. Compiled programs are kept in a persistent
JAX cache under the user's cache folder, shared with the processes tests start, so a second run of
the suite (from any clone) compiles little.

Tests are marked by the fixtures they use, not by hand (`FIXTURE_MARKERS`): a test that reaches the
bundled model, starts a process, compiles for TPU or drives a browser through a fixture carries that
marker, and `scripts/test.sh --fast` (`pytest --fast`) leaves every marked test out. A test that
does one of those things without its fixture fails (`HeavyWorkGuard`), so the fast tier stays fast.
"""

import importlib.util
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()


from pdpo_jax.cache_root import default_cache_root  # noqa: E402 - imports nothing of JAX

# Also set as variables, so the processes tests start share the cache. Programs compiled in under a
# tenth of a second are not worth a file.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(default_cache_root() / "jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# In case a plugin imported JAX before this file set the variables.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

# Session fixtures of the bundled model live here, in one place, so each is built once per session:
# a fixture imported into several test modules is a separate fixture in each (built once per module).
from default_model_fixtures import bundled_gguf, default_model_path, first_layers_model_path  # noqa: E402, F401

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PDPO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

# Property tests (tests/test_fuzz_*.py) draw this many examples each: a small budget in the fast tier
# (scripts/test.sh --fast sets PDPO_HYPOTHESIS_PROFILE=fast), a larger one in the full suite. No
# deadline per example (a shared 2-core machine is slow at times); each test bounds its own time.
HYPOTHESIS_PROFILE_ENV = "PDPO_HYPOTHESIS_PROFILE"
_FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                  HealthCheck.function_scoped_fixture], print_blob=True)
settings.register_profile("fast", max_examples=20, **_FUZZ)
settings.register_profile("full", max_examples=150, **_FUZZ)
settings.load_profile(os.environ.get(HYPOTHESIS_PROFILE_ENV, "full"))

# fixture -> the markers of every test that uses it, directly or through another fixture
FIXTURE_MARKERS = {
    "bundled_gguf": ("bundled_model",),  # tests/default_model_fixtures.py
    "default_model_path": ("bundled_model",),
    "first_layers_model_path": ("bundled_model",),
    "subprocess_env": ("subprocess",),
    "tpu_compiler": ("tpu_compiler",),
    "browser": ("browser",),  # tests/test_annotation_browser.py
    "gcs_emulator": ("gcs",),  # tests/gcs_fixtures.py: a local GCS server (quick; in the fast tier)
}
HEAVY_MARKERS = ("bundled_model", "subprocess", "tpu_compiler", "browser")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fast", action="store_true",
                     help="leave out the tests marked " + ", ".join(HEAVY_MARKERS) + " (the fast tier)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in getattr(item, "fixturenames", ()):
            for marker in FIXTURE_MARKERS.get(fixture, ()):
                item.add_marker(marker)
    heavy = {item for item in items if any(item.get_closest_marker(m) for m in HEAVY_MARKERS)}
    if config.getoption("--fast"):
        config.hook.pytest_deselected(items=[item for item in items if item in heavy])
        items[:] = [item for item in items if item not in heavy]
    # The modules with the most heavy tests first (a module's tests stay together and in order): the
    # workers of scripts/test.sh take modules in this order, so the long ones start early and the
    # short ones even out the end of the run instead of one worker finishing a long module alone.
    heavy_in_module: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        heavy_in_module[module] = heavy_in_module.get(module, 0) + (item in heavy)
    items.sort(key=lambda item: -heavy_in_module[item.nodeid.split("::")[0]])


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The staged PersonaChat/DNLI files; absent in a user's clone, so tests that need them skip."""
    if not (SHARED_DATA / "personachat" / "valid_self_original_no_cands.txt").exists():
        pytest.skip(f"staged data not found at {SHARED_DATA} (set PDPO_SHARED_DATA to its folder)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """The environment of a process a test starts: this one's, with this checkout first on
    PYTHONPATH, so a Python child imports the code under test. Every test that starts a process
    uses it (directly, through a fixture, or with `pytest.mark.usefixtures`)."""
    paths = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


@pytest.fixture(scope="session")
def tpu_compiler() -> None:
    """The TPU compiler (libtpu, used without a TPU by `pdpo plan`); tests that need it skip without it."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (scripts/setup.sh installs it)")


class HeavyWorkGuard:
    """Fails a test that starts a process, reads the bundled model or loads the TPU compiler
    without the marker its fixture gives (an audit hook: it sees every such call, from any code)."""

    PROCESS_EVENTS = ("subprocess.Popen", "os.system", "os.posix_spawn", "os.spawn", "os.exec")
    # Python (the package, a worker, a script), a shell script, a browser. Libraries' own helpers
    # (matplotlib's fc-list, platform's uname) are not what the marker is about.
    GUARDED_PROGRAM = re.compile(r"(python[\d.]*|bash|sh|chromedriver|chrom(e|ium)[\w-]*)")

    def __init__(self) -> None:
        self.item: pytest.Item | None = None
        self.violations: list[str] = []
        self.bundled_dir_part = ""
        self.bundled_gguf_files: set[str] = set()

    def start(self) -> None:
        from pdpo_jax.model import default_model

        self.bundled_dir_part = f"{os.sep}{default_model.DEFAULT_MODEL_NAME}{os.sep}"  # any converted copy
        spec = importlib.util.find_spec(default_model.BUNDLE_PACKAGE)
        locations = (spec.submodule_search_locations or ()) if spec else ()
        self.bundled_gguf_files = {os.path.join(location, default_model.BUNDLED_GGUF_NAME) for location in locations}
        sys.addaudithook(self.audit)

    def needed_marker(self, event: str, args: tuple) -> str | None:
        if event in self.PROCESS_EVENTS:
            return "subprocess" if self.GUARDED_PROGRAM.fullmatch(self.program(event, args)) else None
        if event == "import":
            return "tpu_compiler" if args[0] == "libtpu" else None
        if isinstance(args[0], (str, os.PathLike)):  # open
            path = os.fspath(args[0])
            if isinstance(path, str) and (self.bundled_dir_part in path or path in self.bundled_gguf_files):
                return "bundled_model"
        return None

    @staticmethod
    def program(event: str, args: tuple) -> str:
        """The name of the program a process event starts (a shell for os.system)."""
        if event == "os.system":
            return "sh"
        executable, argv = args[0], args[1]
        if executable is None:
            argv = [argv] if isinstance(argv, (str, bytes, os.PathLike)) else list(argv)
            executable = argv[0] if argv else ""
        name = os.path.basename(os.fsdecode(executable))
        return name.split()[0] if name.strip() else ""

    def audit(self, event: str, args: tuple) -> None:
        item = self.item
        if item is None or event not in ("open", "import") and event not in self.PROCESS_EVENTS:
            return
        needed = self.needed_marker(event, args)
        allowed = (needed, "browser") if needed == "subprocess" else (needed,)
        if needed and not any(item.get_closest_marker(name) for name in allowed):
            fixture = next(f for f, markers in FIXTURE_MARKERS.items() if needed in markers)
            what = self.program(event, args) if event in self.PROCESS_EVENTS else str(args[0])[:120]
            message = (f"{item.nodeid} does {event} {what!r} without the `{needed}` marker: "
                       f"use the `{fixture}` fixture (see tests/conftest.py)")
            self.violations.append(message)
            raise RuntimeError(message)


GUARD = HeavyWorkGuard()


def pytest_sessionstart(session: pytest.Session) -> None:
    GUARD.start()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    GUARD.item, GUARD.violations = item, []
    try:
        return (yield)
    finally:
        GUARD.item = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    result = yield
    if GUARD.violations:  # also those raised where the error was caught (a thread, a fallback)
        pytest.fail("\n".join(GUARD.violations), pytrace=False)
    return result
