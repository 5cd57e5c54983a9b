"""`tuneforge` as a new user meets it: every subcommand's --help, walked from the real parser."""
import argparse

from tuneforge.cli import build_parser, main

COLUMNS = 80


def _commands(parser, path=()):
    """(path, parser) of the command and, recursively, of every subcommand under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, path + (name,))


def test_every_subcommands_help_exits_0_and_fits_the_terminal(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", str(COLUMNS))     # argparse wraps help to the terminal's width
    commands = [path for path, _ in _commands(build_parser())]
    assert ("bench", "e2e") in commands and ("tune",) in commands, "the walk missed nested subcommands"
    problems = []
    for path in commands:
        name = " ".join(("tuneforge", *path))
        try:
            main([*path, "--help"])
            outcome = "returned instead of exiting"
        except SystemExit as e:
            outcome = e.code
        except Exception as e:  # noqa: BLE001  every broken command is reported, not just the first
            outcome = f"{type(e).__name__}: {e}"
        out = capsys.readouterr().out
        if outcome != 0:
            problems.append(f"{name} --help: {outcome}")
        if not out.startswith(f"usage: {name}"):
            problems.append(f"{name} --help printed no usage: {out[:80]!r}")
        problems += [f"{name} --help line wider than {COLUMNS}: {line!r}"
                     for line in out.splitlines() if len(line) > COLUMNS]
    assert not problems, "\n".join(problems)
