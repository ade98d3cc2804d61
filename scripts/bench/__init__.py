"""Benchmarks, side by side: minigpt beside HuggingFace and TransformerLens, one run, one table.

    .venv/bin/python -m scripts.bench                   # CPU: forward and load rows (see --help)
    .venv/bin/python -m scripts.bench --quick           # tiny model and shapes: a smoke run
    .venv/bin/python -m scripts.bench --decode          # plus greedy decode tokens/s
    .venv/bin/python -m scripts.bench --harvest --train # plus harvest throughput and a training step
    .venv/bin/python -m scripts.bench --patching        # plus path patching beside HF + hooks
    .venv/bin/python -m scripts.bench.decode            # decode alone, with its own options

The modules:

    cli          the options and the run (``__main__`` calls it)
    concern      what a concern is: one thing the bench measures (a section of bench.json, a table of bench.md)
    registry     which concerns exist, in the order they run
    contenders   the set-ups: checkpoints, the models loaded from them, the forward contenders
    harness      timing (contenders in shuffled order each round, medians over all calls), peak
                 memory, work in a fresh process, the machine's description
    targets      every target threshold, as one table of data
    report       bench.json and bench.md
    forward      one forward pass: plain, recording taps, HF + hooks, TransformerLens
    load         loading a checkpoint: peak memory over the weights' bytes, time vs from_pretrained
    decode       greedy generation beside HF generate, against the memory-bandwidth floor
    harvest      ``minigpt.harvest`` to disk beside the plain forward and an HF + hooks harvester
    train        the training loop's own optimizer step beside the same step on HF's model
    path_patching  probes.path_patching's sweep over sender heads beside the same sweep by hand with HF hooks

A new concern (a row of the table) is a module exposing ``CONCERN = Concern(...)`` (see
``concern.Concern``) plus one line in ``registry.CONCERNS``; its targets go into
``targets.TARGETS``.
"""
