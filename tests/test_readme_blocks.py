"""Every code block of README.md runs, in the README's order, as a reader would run them one after another.

What runs, and how:
- ```python blocks run in ONE namespace, in order (a name a block uses must be defined by it or by a
  block above it); ```bash blocks run command by command (a line ending in a backslash continues the
  command) in bash, with the test's Python environment's bin directory first on PATH (the ``minigpt``
  command) and this source tree on PYTHONPATH. Every command must exit with status 0.
- Both run in a fresh temporary directory (the current directory), so the files they write never land
  in the repository. That directory first gets the corpus a reader brings (``CORPUS``: ``corpus.jsonl``,
  ``corpus/`` and ``more/``), a few thousand tokens of made-up text.
- No hub here: the hub name ``gpt2`` given to ``from_pretrained`` or ``--model`` is replaced by
  ``pydoc-tiny``, the small trained model that ships inside minigpt (``HUB_NAME``), everywhere.
  (``--size gpt2`` and ``GPT.random("gpt2")`` name a shape, not a download, and stay.)
- ```text blocks (diagrams) are not code. Any other fence language fails the test, so a new block is
  either run or marked.
- A comment line right before a block changes how it runs, each with its reason in parentheses:
  ``<!-- test: skip (reason) -->`` leaves the block out (set-up that installs packages, GPUs, several
  machines, the network: few, each saying why), and ``<!-- test: replace `OLD` => `NEW` (reason) -->``
  runs a smaller variant (fewer steps, a smaller model) of a block that takes long as written.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LANGUAGES = {"python", "bash", "text"}
MAX_SKIPS = 8  # skips stay rare: raising this needs a reason in the README for each new one
COMMAND_TIMEOUT_S = 600
# The hub name as a model to load, and what runs instead where there is no hub.
HUB_NAME = [(re.compile(r'from_pretrained\("gpt2"\)'), 'from_pretrained("pydoc-tiny")'),
            (re.compile(r"--model gpt2(?=\s|$)"), "--model pydoc-tiny")]
SKIP = re.compile(r"<!-- test: skip \((?P<reason>.+)\) -->")
REPLACE = re.compile(r"<!-- test: replace `(?P<old>[^`]+)` => `(?P<new>[^`]*)` \((?P<reason>.+)\) -->")


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # README line of the opening fence
    skip: str | None  # the reason, if the block is left out
    replacements: tuple[tuple[str, str], ...]

    def runnable(self) -> str:
        """The code as the test runs it: the small variants, then the hub name swapped for the shipped model."""
        code = self.code
        for old, new in self.replacements:
            code = code.replace(old, new)
        for pattern, new in HUB_NAME:
            code = pattern.sub(new, code)
        return code


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text`` in order, each with the test directives on the lines right above it."""
    lines = text.splitlines()
    blocks: list[Block] = []
    skip, replacements, i = None, [], 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("<!-- test:"):
            if (m := SKIP.fullmatch(line)) is not None:
                skip = m["reason"]
            elif (m := REPLACE.fullmatch(line)) is not None:
                replacements.append((m["old"], m["new"]))
            else:
                raise AssertionError(f"README.md:{i + 1}: malformed test directive {line!r}")
        elif line.startswith("```"):
            end = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
            blocks.append(Block(line[3:].strip(), "\n".join(lines[i + 1:end]) + "\n", i + 1, skip, tuple(replacements)))
            skip, replacements, i = None, [], end
        elif line and (skip or replacements):
            raise AssertionError(f"README.md:{i + 1}: a test directive must come right before a code block")
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_every_block_is_marked_with_a_known_language() -> None:
    unknown = [(b.line, b.language) for b in BLOCKS if b.language not in LANGUAGES]
    assert not unknown, f"README.md (line, fence language) not in {sorted(LANGUAGES)}: {unknown}"


def test_directives_are_few_and_each_still_applies() -> None:
    skips = [b for b in BLOCKS if b.skip]
    assert len(skips) <= MAX_SKIPS, [b.line for b in skips]
    for block in BLOCKS:
        assert not (block.skip and block.replacements), f"README.md:{block.line}: skipped and replaced"
        for old, _ in block.replacements:  # a stale replacement would silently run the block as written
            assert old in block.code, f"README.md:{block.line}: {old!r} is not in the block"
        if block.language == "text":
            assert not block.skip and not block.replacements, f"README.md:{block.line}: text is never run"


def test_the_blocks_that_install_things_are_the_skipped_ones() -> None:
    for block in BLOCKS:
        if re.search(r"\bpip install\b|scripts/(setup|main|test)\.sh", block.code):
            assert block.skip, f"README.md:{block.line} installs or sets up: mark it skipped, with the reason"


# ---------------------------------------------------------------------------------------------
# Running them


def documents(n: int, words: int, seed: int) -> list[str]:
    """``n`` made-up documents of ``words`` words (deterministic): text enough to harvest and train on."""
    vocabulary = ("the model reads a residual stream and every block writes what attention and the MLP add "
                  "to it while a head moves information between positions of the text").split()
    out = []
    for d in range(n):
        picks = [vocabulary[(seed * 7919 + d * 104729 + w * w * 31 + w) % len(vocabulary)] for w in range(words)]
        out.append(" ".join(picks).capitalize() + ".")
    return out


def write_corpus(where: Path) -> None:
    """CORPUS: what the README's commands name as the reader's corpus (JSONL, a directory, text files)."""
    (where / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(20, 300, 1)),
                                        encoding="utf-8")
    for name, seed in (("corpus", 2), ("more", 3)):
        (where / name).mkdir()
        for i, text in enumerate(documents(20, 300, seed)):  # 5% held out for validation: one document, a window
            (where / name / f"doc{i}.txt").write_text(text, encoding="utf-8")


def shell_commands(code: str) -> list[str]:
    """The block's commands: its non-blank lines, a line ending in a backslash joined to the next."""
    commands, current = [], ""
    for line in code.splitlines():
        current += line
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip() and not current.lstrip().startswith("#"):
            commands.append(current)
        current = ""
    return commands


def run_shell(block: Block, cwd: Path, env: dict[str, str]) -> None:
    for command in shell_commands(block.runnable()):
        done = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT_S)
        assert done.returncode == 0, (f"README.md:{block.line}: exit status {done.returncode} from\n  {command}\n"
                                      f"stdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-4000:]}")


def test_every_block_runs_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_corpus(tmp_path)
    monkeypatch.chdir(tmp_path)
    path = [str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(ROOT)]]
    env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONPATH=os.pathsep.join(path))
    namespace: dict = {"__name__": "__readme__"}
    ran = {"python": 0, "bash": 0}
    for block in BLOCKS:
        if block.skip or block.language == "text":
            continue
        if block.language == "python":
            exec(compile(block.runnable(), f"README.md:{block.line}", "exec"), namespace)
        else:
            run_shell(block, tmp_path, env)
        ran[block.language] += 1
    assert ran["python"] >= 10 and ran["bash"] >= 4, ran
