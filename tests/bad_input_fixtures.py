"""What every bad-input test checks: `pdpo` answers with one line `pdpo <stage>: ...`, exit status 2,
no traceback, in bounded time; and the inputs that used to break that (a YAML alias bomb)."""

from __future__ import annotations

import time

from pdpo_jax import cli

MAX_MESSAGE_CHARS = 300


def run_cli(argv: list[str], capsys) -> tuple[int, str, float]:
    """(exit status, stderr, seconds) of `pdpo ARGV` run in this process."""
    capsys.readouterr()
    start = time.perf_counter()
    status = cli.main(argv)
    seconds = time.perf_counter() - start
    return status, capsys.readouterr().err, seconds


def assert_refused(status: int, error: str, stage: str, *fragments: str) -> None:
    """Exit 2 with one short line naming the stage (and each fragment), no traceback."""
    assert status == 2, (status, error[:500])
    assert error.count("\n") == 1 and error.endswith("\n"), error[:500]
    assert error.startswith(f"pdpo {stage}: "), error[:500]
    assert len(error) < MAX_MESSAGE_CHARS, (len(error), error[:500])
    assert "Traceback" not in error and "internal error" not in error, error
    for fragment in fragments:
        assert fragment in error, error


def nested_aliases(levels: int, width: int = 9) -> str:
    """A YAML flow value of `width` aliases of `width` aliases ... `levels` deep: a few hundred bytes
    that stand for width**levels strings once the aliases are expanded."""
    text = '&a0 "xxxxxxxxx"'
    for level in range(1, levels + 1):
        text = f"&a{level} [" + ", ".join([text] + [f"*a{level - 1}"] * (width - 1)) + "]"
    return text
