"""The command line: its subcommands come from one table and an entry-point group, every failure is
one ``error:`` line and exit 2, and a C/ASCII locale with non-ASCII text neither crashes nor mangles
the files written."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from minigpt import GPT, GPTConfig
from minigpt import cli, command
from minigpt.errors import InputError

TEXT = "Naïve café — 東京 and the residual stream"
TINY = GPTConfig(n_embd=16, n_layer=2, n_head=2, n_positions=64)  # GPT-2's vocabulary, so the text tokenizes
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from test_report import write_checkpoint

    return write_checkpoint(GPT.random(TINY, seed=4), tmp_path_factory.mktemp("cli") / "ckpt")


def run_cli(*args: str, ascii_locale: bool = True) -> subprocess.CompletedProcess:
    """``python -m minigpt ARGS`` in a fresh process; with ascii_locale, under LC_ALL=C and no UTF-8 mode."""
    env = dict(os.environ)
    if ascii_locale:
        env.update(LC_ALL="C", LANG="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
        env.pop("PYTHONIOENCODING", None)
    return subprocess.run([sys.executable, "-m", "minigpt", *args], capture_output=True, env=env, cwd=ROOT,
                          timeout=300)


def test_the_ascii_locale_really_is_ascii():
    """Guards the tests below: under their environment, Python's default encoding is not UTF-8."""
    probe = subprocess.run([sys.executable, "-c", "import locale, sys; print(locale.getpreferredencoding(False), "
                            "sys.stdout.encoding)"], capture_output=True, text=True,
                           env={**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"})
    assert "utf" not in probe.stdout.lower(), probe.stdout


def test_trace_under_an_ascii_locale(checkpoint):
    done = run_cli("trace", TEXT, "--model", str(checkpoint))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    out = done.stdout.decode("ascii")  # every byte printable in the locale: non-ASCII escaped, not crashed
    assert "block L's input + attn_delta + mlp_delta = block L+1's input" in out and ": holds" in out
    assert out.count("\n") > TINY.n_layer + 3


def test_report_under_an_ascii_locale_writes_utf8(checkpoint, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    done = run_cli("report", TEXT, "--model", str(checkpoint), "--out", str(out))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    payload = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert payload["text"] == TEXT
    assert "東京" in (out / "index.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("where", ["under_a_file", "a_file", "proc"])
def test_report_refuses_an_impossible_out_before_loading(checkpoint, tmp_path, where):
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    out = {"under_a_file": blocker / "sub", "a_file": blocker, "proc": Path("/proc/minigpt-report")}[where]
    done = run_cli("report", "hi", "--model", str(checkpoint), "--out", str(out))
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 2 and err.startswith("error: --out ") and "Traceback" not in err, err
    assert "model:" not in err  # refused before the model was loaded
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("argv, message", [
    (["generate", "hi", "--model", "{ckpt}", "--max-new-tokens", "-3"], "max_new_tokens"),
    (["trace", "hi", "--model", "/nonexistent/checkpoint"], "/nonexistent/checkpoint"),
    (["report", "hi", "--model", "{ckpt}", "--block", "99", "--out", "{tmp}"], "block"),
    (["report", "hi", "--model", "{ckpt}", "--head", "-9", "--out", "{tmp}"], "head"),
])
def test_bad_values_end_in_one_error_line(argv, message, checkpoint, tmp_path):
    done = run_cli(*[a.format(tmp=tmp_path, ckpt=checkpoint) for a in argv], ascii_locale=False)
    err = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err


def test_a_bad_option_is_argparse_own_error(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["trace", "hi", "--dtype", "float7"])
    assert stop.value.code == 2 and "error: argument --dtype" in capsys.readouterr().err


def test_output_dir_creates_and_refuses(tmp_path):
    made = command.output_dir(tmp_path / "a" / "b")
    assert made.is_dir() and list(made.iterdir()) == []  # the write test leaves nothing behind
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="--where .*is a file"):
        command.output_dir(tmp_path / "f", option="--where")


def test_commands_come_from_the_table_and_the_entry_points():
    names = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert {"generate", "report", "trace"} <= names


def test_a_broken_plugin_leaves_the_other_commands(monkeypatch, capsys):
    broken = EntryPoint(name="broken", value="no_such_module_here:add", group="minigpt.commands")
    monkeypatch.setattr(cli, "entry_points", lambda group: [broken])
    names = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert "generate" in names and "broken" not in names
    assert "the 'broken' command (no_such_module_here:add) cannot be loaded" in capsys.readouterr().err


def test_a_plugin_listed_twice_is_added_once(monkeypatch):
    """The same package's metadata twice on the path (an old distribution name beside the new one)."""
    report = EntryPoint(name="report", value="probes.cli:add_report", group="minigpt.commands")
    monkeypatch.setattr(cli, "entry_points", lambda group: [report, report])
    names = set(cli.build_parser()._subparsers._group_actions[0].choices)  # argparse refuses a name twice
    assert {"report", "setup", "download", "generate"} <= names


def test_random_weights_of_any_config(tmp_path) -> None:
    """--random takes an official size or a config.json of any shape; anything else is one clear error."""
    import argparse
    import json

    from minigpt.command import add_model_args, load_model
    from minigpt.errors import InputError

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"n_embd": 16, "n_layer": 3, "n_head": 2, "n_positions": 32}))
    model = load_model(parser.parse_args(["--model", str(config), "--random", "--seed", "4"]))
    assert (model.cfg.n_layer, model.cfg.n_embd, model.cfg.n_positions) == (3, 16, 32)
    assert "RANDOM weights (seed 4)" in model.provenance
    config.write_text(json.dumps({"n_embd": 16, "n_layers": 3}))
    with pytest.raises(InputError, match="n_layers"):
        load_model(parser.parse_args(["--model", str(config), "--random"]))
    with pytest.raises(InputError, match="--model 'nowhere' is neither an official size"):
        load_model(parser.parse_args(["--model", "nowhere", "--random"]))
