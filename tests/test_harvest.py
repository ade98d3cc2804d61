"""minigpt.harvest: rows equal model.run on the same windows, the index is right, shards stay under
their bound, a run killed with SIGKILL resumes without gap or duplicate, other settings over the same
directory are refused, two torchrun processes give the rows of one, and bad inputs are HarvestErrors."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from minigpt import GPT, GPTConfig, MemoryBudgetError, MiniGPTWarning
from minigpt.config import END_OF_TEXT
from minigpt.harvest import HarvestError, harvest, read
from minigpt.taps import Taps

ROOT = Path(__file__).resolve().parent.parent
CFG = GPTConfig(n_layer=2, n_head=2, n_embd=16, n_positions=64)
FOUR = ["blocks.*.resid_pre", "blocks.*.attn_delta", "blocks.*.mlp_delta", "blocks.*.resid_post"]
WORDS = "the a tower river blue quickly walks over under Paris 1999 , . ; ( ) ok".split()


@pytest.fixture(scope="module")
def model() -> GPT:
    return GPT.random(CFG, seed=1)


def text(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    """Two text files (one document each, lengths not a multiple of the context), a JSONL file with an
    empty document, and a lines file."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(text(0, 70))
    (d / "b.txt").write_text(text(1, 9))
    (d / "c.jsonl").write_text(json.dumps({"text": text(2, 40)}) + "\n\n" + json.dumps({"text": ""}) + "\n"
                               + json.dumps({"text": text(3, 25) + END_OF_TEXT + text(4, 5)}) + "\n")
    return [d / "a.txt", d / "b.txt", d / "c.jsonl"]


def reference_texts(files: list[Path]) -> list[str]:
    """Each document's text, read independently of the harvest's own reader."""
    texts = []
    for f in files:
        if f.suffix == ".jsonl":
            texts += [json.loads(line)["text"] for line in f.read_text().splitlines() if line.strip()]
        else:
            texts.append(f.read_text())
    return texts


def reference_documents(model: GPT, files: list[Path]) -> list[list[int]]:
    """Each document's token ids, read independently of the harvest's own reader."""
    return [model.tokenizer.encode(t, allowed_special={END_OF_TEXT}) for t in reference_texts(files)]


def keyed(directory: Path, tap: str) -> dict[tuple[int, int], tuple[int, torch.Tensor]]:
    """(document, position) -> (token, row) of a harvest; fails on a duplicate key."""
    rows = read(directory, tap)
    everything = rows[:]
    found = {}
    for i, (d, p, t) in enumerate(zip(rows.document.tolist(), rows.position.tolist(), rows.token.tolist())):
        assert (d, p) not in found, f"row {(d, p)} twice"
        found[d, p] = (t, everything[i])
    return found


def test_rows_equal_model_run_on_each_window_float32_exact(model, corpus, tmp_path) -> None:
    context = 16
    harvest(model, corpus, FOUR + ["blocks.1.attn.q"], tmp_path / "h", context=context, store_dtype=torch.float32,
            batch_size=1, shard_bytes=40_000, quiet=True)
    docs = reference_documents(model, corpus)
    taps = [f"blocks.{L}.{t}" for L in range(2) for t in ("resid_pre", "attn_delta", "mlp_delta", "resid_post")]
    taps.append("blocks.1.attn.q")
    got = {tap: keyed(tmp_path / "h", tap) for tap in taps}
    expected_keys = {(d, p) for d, ids in enumerate(docs) for p in range(len(ids))}
    for tap in taps:
        assert set(got[tap]) == expected_keys  # every token once: no gap, no duplicate, empty document skipped
    for d, ids in enumerate(docs):
        for start in range(0, len(ids), context):
            window = ids[start:start + context]
            _, trace = model.run(window, taps=taps)
            for tap in taps:
                for i, token in enumerate(window):
                    t, row = got[tap][d, start + i]
                    assert t == token
                    assert torch.equal(row, trace[tap][0, i]), (tap, d, start + i)


def test_ragged_batches_float64_and_bf16_is_the_rounding_of_float32(corpus, tmp_path) -> None:
    model64 = GPT.random(CFG, seed=1, dtype=torch.float64)
    harvest(model64, corpus, "blocks.1.resid_post", tmp_path / "f64", context=16, store_dtype=torch.float64,
            batch_size=3, shard_bytes=20_000, quiet=True)
    got = keyed(tmp_path / "f64", "blocks.1.resid_post")
    for d, ids in enumerate(reference_documents(model64, corpus)):
        for start in range(0, len(ids), 16):
            _, trace = model64.run(ids[start:start + 16], taps="blocks.1.resid_post")
            rows = torch.stack([got[d, start + i][1] for i in range(len(ids[start:start + 16]))])
            torch.testing.assert_close(rows, trace["blocks.1.resid_post"][0], rtol=1e-12, atol=1e-12)
    model = GPT.random(CFG, seed=1)
    for dtype in (torch.float32, torch.bfloat16):
        harvest(model, corpus, FOUR, tmp_path / str(dtype), context=16, store_dtype=dtype, batch_size=3, quiet=True)
    full = read(tmp_path / str(torch.float32), "blocks.0.mlp_delta")
    half = read(tmp_path / str(torch.bfloat16), "blocks.0.mlp_delta")
    assert half.dtype == torch.bfloat16 and torch.equal(half[:], full[:].to(torch.bfloat16))
    assert torch.equal(half.document, full.document) and torch.equal(half.position, full.position)


def test_the_old_keywords_positions_and_dtype_still_work_with_a_deprecation_warning(model, corpus, tmp_path) -> None:
    new = harvest(model, corpus, "blocks.0.resid_post", tmp_path / "new", context=16, keep_positions="last",
                  store_dtype=torch.float32, quiet=True)
    with pytest.warns(DeprecationWarning) as caught:
        old = harvest(model, corpus, "blocks.0.resid_post", tmp_path / "old", context=16, positions="last",
                      dtype=torch.float32, quiet=True)
    messages = " | ".join(str(w.message) for w in caught)
    assert "positions= is renamed keep_positions=" in messages
    assert "dtype= is renamed store_dtype=" in messages
    assert all(w.filename == __file__ for w in caught), "the warnings point at the caller's line"
    assert old["settings"] == new["settings"] and old["rows"] == new["rows"] == len(read(tmp_path / "new",
                                                                                         "blocks.0.resid_post"))
    assert torch.equal(read(tmp_path / "old", "blocks.0.resid_post")[:], read(tmp_path / "new", "blocks.0.resid_post")[:])
    with pytest.raises(HarvestError, match="give only keep_positions="):
        harvest(model, corpus, "blocks.0.resid_post", tmp_path / "both", positions="all", keep_positions="last",
                quiet=True)


def test_the_command_line_old_spellings_are_deprecated_aliases() -> None:
    from minigpt.cli import build_parser

    base = ["harvest", "--data", "c.txt", "--taps", "blocks.0.resid_post", "--out", "o"]
    args = build_parser().parse_args(base + ["--dtype", "float64", "--store-dtype", "float32", "--keep-positions", "last"])
    assert (args.dtype, args.store_dtype, args.keep_positions) == ("float64", "float32", "last")
    args = build_parser().parse_args(base)
    assert (args.dtype, args.store_dtype, args.keep_positions) == ("float32", "bfloat16", "all")
    with pytest.warns(DeprecationWarning) as caught:
        args = build_parser().parse_args(base + ["--positions", "last", "--model-dtype", "float64"])
    messages = " | ".join(str(w.message) for w in caught)
    assert "--positions is deprecated" in messages and "use --keep-positions" in messages
    assert "--model-dtype is deprecated" in messages and "use --dtype" in messages
    assert (args.dtype, args.store_dtype, args.keep_positions) == ("float64", "bfloat16", "last")


@pytest.mark.parametrize("quiet", [True, False])
def test_the_corpus_is_tokenized_once_with_or_without_the_progress_bar(model, corpus, tmp_path, monkeypatch,
                                                                      quiet) -> None:
    encoding = model.tokenizer
    real, texts = encoding.encode, []
    monkeypatch.setattr(encoding, "encode", lambda text, **options: texts.append(text) or real(text, **options))
    manifest = harvest(model, corpus, "blocks.0.resid_post", tmp_path / "h", context=16, batch_size=1,
                       shard_bytes=2_000, quiet=quiet)
    assert len(manifest["shards"]) > 2 and texts == reference_texts(corpus), "each document encoded once, in order"


def test_positions_last_and_max_tokens(model, corpus, tmp_path) -> None:
    docs = reference_documents(model, corpus)
    manifest = harvest(model, corpus, "blocks.0.resid_post", tmp_path / "last", context=16, keep_positions="last",
                       store_dtype=torch.float32, batch_size=2, quiet=True)
    rows = read(tmp_path / "last", "blocks.0.resid_post")
    windows = [(d, s, ids[s:s + 16]) for d, ids in enumerate(docs) for s in range(0, len(ids), 16)]
    assert len(rows) == len(windows) and manifest["tokens"] == sum(len(ids) for ids in docs)
    for i, (d, s, window) in enumerate(windows):
        assert (rows.document[i], rows.position[i], rows.token[i]) == (d, s + len(window) - 1, window[-1])
        _, trace = model.run(window, taps="blocks.0.resid_post")
        torch.testing.assert_close(rows[i], trace["blocks.0.resid_post"][0, -1], rtol=1e-6, atol=1e-6)
    capped = harvest(model, corpus, "blocks.0.resid_post", tmp_path / "cap", context=16, max_tokens=37, quiet=True)
    rows = read(tmp_path / "cap", "blocks.0.resid_post")
    assert capped["tokens"] == capped["rows"] == len(rows) == 37
    assert rows.document.tolist() == [0] * 37 and rows.position.tolist() == list(range(37))


def test_shards_bounded_manifest_checksums_and_the_minibatch_iterator(model, corpus, tmp_path) -> None:
    limit = 12_000
    manifest = harvest(model, corpus, FOUR, tmp_path / "h", context=8, shard_bytes=limit, batch_size=4, quiet=True)
    assert len(manifest["shards"]) > 3
    for record in manifest["shards"]:
        size = (tmp_path / "h" / record["file"]).stat().st_size
        assert size == record["bytes"] <= limit
    assert manifest["settings"]["taps"][0] == "blocks.0.resid_pre" and manifest["settings"]["context"] == 8
    rows = read(tmp_path / "h", "blocks.1.resid_pre", verify=True)
    assert len(rows) == manifest["rows"] and rows.row_shape == (CFG.n_embd,)
    seen = []
    for batch, which in rows.batches(50, seed=3):
        assert torch.equal(batch, rows[which])
        seen.append(which)
    order = torch.cat(seen)
    assert sorted(order.tolist()) == list(range(len(rows))) and order.tolist() != list(range(len(rows)))
    again = torch.cat([w for _, w in rows.batches(50, seed=3)])
    assert torch.equal(order, again)
    # A shard changed after the harvest is caught by verify.
    path = tmp_path / "h" / manifest["shards"][1]["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(HarvestError, match="not the shard the manifest lists"):
        read(tmp_path / "h", "blocks.1.resid_pre", verify=True)


def test_shards_smaller_than_a_batch_warn_and_name_a_size_that_is_enough(model, corpus, tmp_path) -> None:
    """A batch never spans two shards, so shards of fewer windows than a batch mean smaller forwards: said."""
    with pytest.warns(MiniGPTWarning, match=r"a shard holds 1 full window\(s\).*fewer than batch_size=4") as caught:
        small = harvest(model, corpus, "blocks.0.resid_post", tmp_path / "small", context=16, batch_size=4,
                        shard_bytes=1_000, quiet=True)
    assert caught[0].filename == __file__, "the warning points at the caller's line"
    needed = int(re.search(r"at least ([\d,]+) bytes", str(caught[0].message)).group(1).replace(",", ""))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MiniGPTWarning)
        harvest(model, corpus, "blocks.0.resid_post", tmp_path / "enough", context=16, batch_size=4,
                shard_bytes=needed, quiet=True)
        with pytest.raises(MiniGPTWarning):
            harvest(model, corpus, "blocks.0.resid_post", tmp_path / "short", context=16, batch_size=4,
                    shard_bytes=needed - 1, quiet=True)
    # The rows are the same either way (the batches differ: up to float rounding).
    a, b = read(tmp_path / "small", "blocks.0.resid_post"), read(tmp_path / "enough", "blocks.0.resid_post")
    assert len(a) == len(b) == small["rows"] and torch.equal(a.position, b.position)
    torch.testing.assert_close(a[:], b[:])


def test_the_sink_gets_what_the_trace_records(model) -> None:
    got = {}
    taps = ["blocks.0.attn.q", "blocks.1.resid_post"]
    call = Taps(taps, sink=lambda name, x: got.__setitem__(name, x.clone()))
    tokens = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        model(tokens, call)
    _, trace = model.run(tokens, taps=taps)
    assert call.trace == {} and set(got) == set(taps)
    for tap in taps:
        assert torch.equal(got[tap], trace[tap])


# ---------------------------------------------------------------------------------------------
# Processes: killed and resumed, torchrun


def write_checkpoint(directory: Path) -> Path:
    from scripts.bench.contenders import write_checkpoint
    return write_checkpoint(directory, CFG, seed=1)


def command(checkpoint: Path, data: list[Path], out: Path, *extra: str) -> list[str]:
    return ["-m", "minigpt", "harvest", "--model", str(checkpoint), "--data", *map(str, data), "--taps", *FOUR,
            "--out", str(out), "--context", "16", "--shard-mb", "0.02", "--batch-size", "2", "--quiet",
            "--device", "cpu", *extra]


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("big")
    (d / "lines.txt").write_text("\n".join(text(10 + i, 30 + i % 17) for i in range(120)))
    return [d / "lines.txt"]


@pytest.mark.slow
def test_killed_with_sigkill_and_resumed_equals_an_uninterrupted_run(tmp_path, big_corpus) -> None:
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    whole = run(command(checkpoint, big_corpus, tmp_path / "whole", "--lines"))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    shards = out / "shards"
    for kill_after in (3, 12):  # killed twice, at different points
        process = subprocess.Popen([sys.executable, *command(checkpoint, big_corpus, out, "--lines")], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(list(shards.glob("*.safetensors"))) < kill_after and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
        # Whatever carries a shard's name is whole: it matches its record and reads.
        from minigpt.harvest.storage import finished_shards
        for index, record in finished_shards(out).items():
            import hashlib
            assert hashlib.sha256((out / record["file"]).read_bytes()).hexdigest() == record["sha256"]
    with pytest.raises(HarvestError, match="unfinished"):
        read(out, "blocks.0.resid_pre")
    resumed = run(command(checkpoint, big_corpus, out, "--lines"))
    assert resumed.returncode == 0, resumed.stderr
    assert not list(shards.glob("*.tmp"))
    for tap in ("blocks.0.resid_pre", "blocks.1.resid_post"):
        a, b = keyed(tmp_path / "whole", tap), keyed(out, tap)
        assert set(a) == set(b)
        assert all(a[k][0] == b[k][0] and torch.equal(a[k][1], b[k][1]) for k in a)
    assert json.loads((out / "manifest.json").read_text())["shards"] == \
        json.loads((tmp_path / "whole" / "manifest.json").read_text())["shards"]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_give_the_rows_of_one(tmp_path, big_corpus) -> None:
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    one = run(command(checkpoint, big_corpus, tmp_path / "one", "--lines"))
    assert one.returncode == 0, one.stderr
    two = run(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               *command(checkpoint, big_corpus, tmp_path / "two", "--lines")])
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and len(manifest["shards"]) > 2
    for tap in ("blocks.0.resid_pre", "blocks.1.mlp_delta"):
        a, b = keyed(tmp_path / "one", tap), keyed(tmp_path / "two", tap)
        assert set(a) == set(b)
        assert all(a[k][0] == b[k][0] and torch.equal(a[k][1], b[k][1]) for k in a)


# ---------------------------------------------------------------------------------------------
# Refusals


def test_other_settings_over_an_existing_directory_are_refused(model, corpus, tmp_path) -> None:
    harvest(model, corpus, "blocks.0.resid_post", tmp_path / "h", context=16, quiet=True)
    before = sorted(p.name for p in (tmp_path / "h" / "shards").iterdir())
    with pytest.raises(HarvestError, match=r"other settings \(context: 16 there, 8 now\)"):
        harvest(model, corpus, "blocks.0.resid_post", tmp_path / "h", context=8, quiet=True)
    with pytest.raises(HarvestError, match="taps"):
        harvest(model, corpus, "blocks.1.resid_post", tmp_path / "h", context=16, quiet=True)
    with pytest.raises(HarvestError, match="weights_sample_sha256"):
        harvest(GPT.random(CFG, seed=2), corpus, "blocks.0.resid_post", tmp_path / "h", context=16, quiet=True)
    assert sorted(p.name for p in (tmp_path / "h" / "shards").iterdir()) == before
    # The same settings again: nothing to do, the same manifest.
    again = harvest(model, corpus, "blocks.0.resid_post", tmp_path / "h", context=16, quiet=True)
    assert len(again["shards"]) == len(before) // 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(HarvestError, match="holds files minigpt did not write"):
        harvest(model, corpus, "blocks.0.resid_post", tmp_path / "other", quiet=True)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("bad_jsonl", r"bad\.jsonl, line 2: not JSON"),
    ("no_text_field", "string 'text' field"),
    ("empty", "holds no tokens"),
    ("bad_taps", "bad --taps: tap pattern 'blocks.\\*.resid_poast' matches no tap"),
    ("pattern_tap", r"\[B, H, Q, K\]"),
    ("out_under_a_file", "cannot write into"),
    ("out_is_a_file", "is not a directory"),
    ("context", "context must be"),
    ("positions", "positions must be"),
    ("tiny_shard", "cannot hold one window"),
    ("not_utf8", "not UTF-8"),
])
def test_bad_inputs_are_harvest_errors(model, corpus, tmp_path, case, message) -> None:
    data, taps, out, options = corpus, "blocks.0.resid_post", tmp_path / "out", {}
    if case == "missing":
        data = [corpus[0], tmp_path / "nowhere.txt"]
    elif case == "bad_jsonl":
        (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
        data = [tmp_path / "bad.jsonl"]
    elif case == "no_text_field":
        (tmp_path / "bad.jsonl").write_text('{"body": "fine"}\n')
        data = [tmp_path / "bad.jsonl"]
    elif case == "empty":
        (tmp_path / "empty.txt").write_text("")
        (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
        data = [tmp_path / "empty.txt", tmp_path / "empty.jsonl"]
    elif case == "bad_taps":
        taps = "blocks.*.resid_poast"
    elif case == "pattern_tap":
        taps = ["blocks.0.resid_post", "blocks.0.attn.pattern"]
    elif case == "out_under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    elif case == "out_is_a_file":
        out.write_text("x")
    elif case == "context":
        options = {"context": CFG.n_positions + 1}
    elif case == "positions":
        options = {"keep_positions": "first"}
    elif case == "tiny_shard":
        options = {"shard_bytes": 100, "context": 16}
    elif case == "not_utf8":
        (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
        data = [tmp_path / "latin1.txt"]
    with pytest.raises(HarvestError, match=message):
        harvest(model, data, taps, out, quiet=True, **options)
    if case not in ("out_is_a_file", "out_under_a_file"):
        assert not out.exists(), "a refused harvest must leave nothing behind"


def test_the_memory_guard_refuses_a_harvest_that_cannot_fit(model, corpus, tmp_path, monkeypatch) -> None:
    import minigpt.memory
    monkeypatch.setattr(minigpt.memory, "available_memory", lambda device: 10 * 2**20)
    with pytest.raises(MemoryBudgetError, match="smaller --batch-size"):
        harvest(model, corpus, FOUR, tmp_path / "h", context=16, shard_bytes=64 * 2**20, quiet=True)
    assert not (tmp_path / "h").exists()


def test_parquet_corpus(model, tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    texts = [text(20, 30), text(21, 3)]
    pq.write_table(pa.table({"text": texts, "id": [1, 2]}), tmp_path / "c.parquet")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    a = harvest(model, [tmp_path / "c.parquet"], "blocks.0.resid_post", tmp_path / "pq", context=16, quiet=True)
    b = harvest(model, [tmp_path / "c.jsonl"], "blocks.0.resid_post", tmp_path / "js", context=16, quiet=True)
    assert a["rows"] == b["rows"] > 0
    assert torch.equal(read(tmp_path / "pq", "blocks.0.resid_post")[:], read(tmp_path / "js", "blocks.0.resid_post")[:])


def test_reader_refuses_what_is_not_a_finished_harvest(model, corpus, tmp_path) -> None:
    with pytest.raises(HarvestError, match="no harvest"):
        read(tmp_path, "blocks.0.resid_post")
    harvest(model, corpus, "blocks.0.resid_post", tmp_path / "h", quiet=True)
    with pytest.raises(HarvestError, match="was not harvested"):
        read(tmp_path / "h", "blocks.1.resid_post")
    manifest = json.loads((tmp_path / "h" / "manifest.json").read_text())
    shard = tmp_path / "h" / manifest["shards"][0]["file"]
    (tmp_path / "elsewhere.safetensors").write_bytes(shard.read_bytes())
    manifest["shards"][0]["file"] = "../elsewhere.safetensors"
    (tmp_path / "h" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HarvestError, match="outside the harvest directory"):
        read(tmp_path / "h", "blocks.0.resid_post")
    manifest["shards"][0]["file"] = "shards/shard-000000.safetensors"
    (tmp_path / "h" / "manifest.json").write_text(json.dumps(manifest))
    shard.unlink()
    shard.symlink_to(tmp_path / "elsewhere.safetensors")  # the right name, but a link out of the directory
    with pytest.raises(HarvestError, match="outside the harvest directory"):
        read(tmp_path / "h", "blocks.0.resid_post")
    shard.unlink()
    os.mkfifo(shard)  # opening it would block forever
    with pytest.raises(HarvestError, match="a named pipe, not a regular file; a harvest holds plain files"):
        read(tmp_path / "h", "blocks.0.resid_post")
    (tmp_path / "h" / "manifest.json").write_text("[" * 100 + "]" * 100)
    with pytest.raises(HarvestError, match="nested more than 64 deep.*the harvest directory is damaged"):
        read(tmp_path / "h", "blocks.0.resid_post")


def test_cli_harvest_and_its_errors(model, corpus, tmp_path) -> None:
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    done = run(command(checkpoint, corpus, tmp_path / "h"))
    assert done.returncode == 0, done.stderr
    assert "harvested" in done.stderr and "shards" in done.stderr
    assert read(tmp_path / "h", "blocks.0.resid_pre").dtype == torch.bfloat16
    bad = run(command(checkpoint, [tmp_path / "missing.txt"], tmp_path / "h2"))
    assert bad.returncode == 2 and "error: corpus file" in bad.stderr and "Traceback" not in bad.stderr
