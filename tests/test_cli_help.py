"""The command line explains itself: --version, help on every argument, examples, exit codes."""

from __future__ import annotations

import argparse
import re

import pytest

import clpd_ray
from clpd_ray.cli import build_parser


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"clpd {clpd_ray.__version__}"


def test_every_argument_of_every_subcommand_has_help() -> None:
    commands = _subcommands()
    assert {"demo", "run", "validate", "ladder", "ablate", "report", "status"} <= set(commands)
    missing = [
        f"clpd {name} {'/'.join(a.option_strings) or a.dest}"
        for name, parser in commands.items()
        for a in parser._actions
        if not (a.help or "").strip()
    ]
    assert missing == []


@pytest.mark.parametrize(
    "name", ["demo", "run", "validate", "ladder", "ablate", "report", "status"]
)
def test_each_subcommand_shows_examples_and_exit_codes(name: str) -> None:
    text = _subcommands()[name].format_help()
    assert re.search(rf"examples:\n  clpd {name}\b", text)
    for code in ("0    ok", "1    internal error", "2    bad input", "130", "143"):
        assert code in text
