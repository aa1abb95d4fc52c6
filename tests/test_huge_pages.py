"""A `pdpo` command asks glibc for transparent huge pages by starting itself again with the tunable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pdpo_jax import huge_pages
from pdpo_jax.huge_pages import TUNABLE, kernel_thp_mode, tunables_with_huge_pages

GLIBC = (2, 36)


def test_the_tunable_is_added_where_glibc_and_the_kernel_take_it():
    assert tunables_with_huge_pages({}, GLIBC, "madvise") == TUNABLE
    assert tunables_with_huge_pages({}, GLIBC, "always") == TUNABLE
    assert tunables_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise") == \
        f"glibc.malloc.arena_max=2:{TUNABLE}"


@pytest.mark.parametrize("env, glibc, mode", [
    ({}, GLIBC, "never"),  # the kernel gives no huge pages
    ({}, GLIBC, None),  # no THP file: not Linux, or a kernel without THP
    ({}, (2, 34), "madvise"),  # glibc before the tunable
    ({}, None, "madvise"),  # not glibc (macOS, musl)
    ({"PDPO_HUGE_PAGES": "0"}, GLIBC, "madvise"),  # the user said no
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise"),  # the user chose: theirs stands
    ({"GLIBC_TUNABLES": TUNABLE}, GLIBC, "madvise"),  # started again already
])
def test_nothing_changes_where_the_tunable_would_do_nothing_or_is_chosen_already(env, glibc, mode):
    assert tunables_with_huge_pages(env, glibc, mode) is None


def test_the_kernel_mode_is_the_bracketed_word(tmp_path):
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    assert kernel_thp_mode(tmp_path / "enabled") == "madvise"
    (tmp_path / "enabled").write_text("[always] madvise never\n")
    assert kernel_thp_mode(tmp_path / "enabled") == "always"
    assert kernel_thp_mode(tmp_path / "absent") is None


@pytest.mark.skipif(sys.platform != "linux"
                    or not huge_pages.tunable_takes_effect(huge_pages.glibc_version(), kernel_thp_mode()),
                    reason="needs Linux with glibc >= 2.35 and transparent huge pages not 'never'")
def test_a_process_starts_itself_again_once_with_the_tunable_and_its_arguments(subprocess_env, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        with open(sys.argv[1], "a") as log:  # one line per start of this process
            log.write(f"{os.getpid()} {os.environ.get('GLIBC_TUNABLES', '')} {sys.argv[2:]}\\n")
        from pdpo_jax.huge_pages import restart_with_huge_pages
        restart_with_huge_pages()
    """))
    log = tmp_path / "starts.txt"
    env = {key: value for key, value in subprocess_env.items() if key not in ("GLIBC_TUNABLES", "PDPO_HUGE_PAGES")}
    subprocess.run([sys.executable, str(script), str(log), "a b", "--flag"], env=env, check=True, timeout=60)
    starts = log.read_text().splitlines()
    assert len(starts) == 2, starts
    first, second = (line.split(" ", 2) for line in starts)
    assert first[0] == second[0]  # the same process, replaced
    assert first[1] == "" and second[1] == TUNABLE
    assert first[2] == second[2] == "['a b', '--flag']"
