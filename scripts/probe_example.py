#!/usr/bin/env python
"""Worked example: harvest a corpus, then fit a linear probe per layer on the harvested rows.

    .venv/bin/python scripts/probe_example.py                       # pydoc-tiny, the small model shipped here
    .venv/bin/python scripts/probe_example.py --model gpt2          # real weights (hub name or directory)
    .venv/bin/python scripts/probe_example.py --random              # random GPT-2 small weights

The corpus: the docstrings of Python's standard library modules (English prose, on every machine,
offline), written as JSONL. The harvest: the residual stream entering every block and leaving the
last one (13 points for GPT-2 small), windows of 128 tokens, bf16. Two things computable from the
text are probed at every point:

  starts a word   whether the token begins with a space (classes: logistic regression, accuracy)
  position        the token's position in its window, 0..127 (scalar: ridge regression, R^2)

Split: 20% of the documents held out (seed 0), so no probe is tested on text it was trained on.
Writes the harvest to OUT/acts, the scores to OUT/probes.json and the figure to OUT/harvest_probes.png
(--figure elsewhere).
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minigpt import GPT  # noqa: E402
from minigpt.harvest import harvest, read  # noqa: E402
from probes import linear  # noqa: E402


def stdlib_docstrings(path: Path, least_chars: int = 300) -> Path:
    """The standard library's module docstrings of at least ``least_chars`` characters, as JSONL."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    with path.open("w", encoding="utf-8") as f:
        for source in sorted(lib.glob("*.py")):
            try:
                doc = ast.get_docstring(ast.parse(source.read_text(encoding="utf-8")))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            if doc and len(doc) >= least_chars:
                f.write(json.dumps({"text": doc, "module": source.stem}) + "\n")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="pydoc-tiny", help="hub name or checkpoint directory (default: pydoc-tiny, the "
                   "small trained model shipped with minigpt)")
    p.add_argument("--random", action="store_true", help="random GPT-2 small weights instead")
    p.add_argument("--out", default="probe-example", help="working directory (default: probe-example/)")
    p.add_argument("--figure", default=None, help="where the PNG goes (default: OUT/harvest_probes.png; README's "
                   "figure is docs/harvest_probes.png, overwritten only if named here)")
    p.add_argument("--max-tokens", type=int, default=12_000)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = GPT.random("gpt2", seed=0) if args.random else GPT.from_pretrained(args.model)
    model_name = "random GPT-2 small weights (seed 0)" if args.random else args.model
    n = model.cfg.n_layer
    corpus = stdlib_docstrings(out / "corpus.jsonl")
    points = [f"blocks.{L}.resid_pre" for L in range(n)] + [f"blocks.{n - 1}.resid_post"]
    manifest = harvest(model, corpus, points, out / "acts", context=args.context, max_tokens=args.max_tokens)
    print(f"harvested {manifest['tokens']:,} tokens of {model.source}")

    layers = {i: read(out / "acts", point) for i, point in enumerate(points)}  # 0 = embeddings, i = after block i-1
    first = layers[0]
    starts_word = torch.tensor([model.tokenizer.decode([t]).startswith(" ") for t in first.token.tolist()]).long()
    position = (first.position % args.context).double()
    results = {"starts a word (accuracy)": linear.fit_per_layer(layers, starts_word, groups=first.document, seed=0),
               "position in window (R^2)": linear.fit_per_layer(layers, position, groups=first.document, seed=0)}

    summary = {"model": model.source, "tokens": manifest["tokens"], "points": points, "seed": 0, "test_fraction": 0.2,
               "split": "by document", **{name: {"scores": list(r.scores.values()),
                                                 "baseline": [p.baseline for p in r.probes.values()],
                                                 "n_train": r.n_train, "n_test": r.n_test}
                                          for name, r in results.items()}}
    (out / "probes.json").write_text(json.dumps(summary, indent=1))
    print(f"{'point':>26} " + " ".join(f"{name:>26}" for name in results))
    for i, point in enumerate(points):
        print(f"{point:>26} " + " ".join(f"{r.scores[i]:>26.3f}" for r in results.values()))
    print(f"majority-class accuracy of 'starts a word' on the held-out rows: "
          f"{results['starts a word (accuracy)'].probes[0].baseline:.3f}")
    figure(results, points, model_name, manifest["tokens"], Path(args.figure or out / "harvest_probes.png"))


def figure(results: dict, points: list[str], model_name: str, tokens: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    x = list(range(len(points)))
    for (name, r), marker in zip(results.items(), "os"):
        ax.plot(x, list(r.scores.values()), marker=marker, label=name)
    ax.axhline(results["starts a word (accuracy)"].probes[0].baseline, color="grey", linestyle=":",
               label="starts a word: majority class")
    ax.set_xticks(x, ["emb"] + [str(i) for i in range(1, len(points))])
    ax.set_xlabel("residual stream after block (emb = block 0's input)")
    ax.set_ylabel("held-out score")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Linear probes per layer, {tokens:,} harvested tokens\n{model_name}", fontsize=9)
    ax.legend(fontsize=8, loc="center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
