"""``minigpt COMMAND --help`` says every option's default, and describes options as they behave."""
from __future__ import annotations

import argparse

import pytest

from minigpt import cli


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def help_text(name: str, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.main([name, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_that_takes_a_value_says_its_default(name: str, capsys) -> None:
    parser = subcommands()[name]
    shown = help_text(name, capsys)
    for action in parser._actions:
        if not action.option_strings or action.required or action.nargs == 0 or action.help == argparse.SUPPRESS:
            continue  # positionals, required options, flags and hidden (deprecated) spellings
        formatted = parser._get_formatter()._expand_help(action)
        assert "default" in formatted, f"minigpt {name} {action.option_strings[0]}: {formatted!r}"
        assert " ".join(formatted.split()) in " ".join(shown.split())  # and --help shows it


def test_generate_seed_says_it_seeds_the_sampling(capsys) -> None:
    shown = " ".join(help_text("generate", capsys).split())
    assert "--seed SEED seed of the sampling" in shown
    assert shown.count("--seed") == 2  # in the usage line and once among the options: replaced, not added


def test_examples_keep_their_lines_and_descriptions_wrap(capsys) -> None:
    shown = help_text("harvest", capsys)
    assert "\n  minigpt harvest --model gpt2 --data corpus.jsonl --taps 'blocks.*.resid_post' --out acts/" in shown
    assert max(len(line) for line in shown.splitlines() if not line.startswith("  ")) <= 100
