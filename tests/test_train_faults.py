"""minigpt.training under faults: divergence, a kill at every point of a save, foreign directories,
damaged or hostile files on resume, a full disk. After each, the committed checkpoint and the exported
model are as they were, bit for bit, and the same command goes on to the uninterrupted run's result."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minigpt import GPT, CheckpointError, TrainingError
from minigpt import files
from minigpt.training import Settings, checkpoint, train
from minigpt.training import loop as train_module
from test_fuzz import watchdog
from test_train import CFG, QUICK, ROOT, losses, text

FAULT = replace(QUICK, steps=4)  # checkpoints at steps 2 and 4 (save_every=2)
SAVE_EVERY = 2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    with (d / "docs.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"text": text(i, 30 + i % 13)}) + "\n")
    return d / "docs.jsonl"


def run(corpus: Path, out: Path, **kwargs) -> dict:
    return train(corpus, CFG, out, FAULT, save_every=SAVE_EVERY, quiet=True, **kwargs)


@pytest.fixture(scope="module")
def whole(corpus, tmp_path_factory) -> tuple[dict, bytes]:
    """The uninterrupted run: its state and its exported weights."""
    out = tmp_path_factory.mktemp("whole") / "run"
    state = run(corpus, out)
    return state, (out / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def at_step_2(corpus, tmp_path_factory) -> Path:
    """A run interrupted after its checkpoint of step 2 (copied by each test that changes it)."""
    out = tmp_path_factory.mktemp("snapshot") / "run"
    real = train_module.learning_rate

    def interrupted(step: int, s: Settings) -> float:
        if step == 2:
            raise KeyboardInterrupt
        return real(step, s)

    train_module.learning_rate = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run(corpus, out)
    finally:
        train_module.learning_rate = real
    assert checkpoint.load_state(out)["step"] == 2
    return out


def copy_of(snapshot: Path, where: Path) -> Path:
    shutil.copytree(snapshot, where, symlinks=True)
    return where


def tree(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` (relative path -> bytes)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_export_is_committed(out: Path) -> int:
    """DIR/model.safetensors and config.json are those of the committed step; returns the step."""
    state = checkpoint.load_state(out)
    assert sha256(out / "model.safetensors") == state["files"][f"model-{state['step']}.safetensors"]
    assert json.loads((out / "config.json").read_text()) == state["config_json"]
    return state["step"]


# Divergence


def poisoned_at(step_index: int, monkeypatch) -> None:
    """The training loss of step ``step_index`` (0-based) becomes NaN."""
    real_lr, real_loss, now = train_module.learning_rate, train_module.loss_of, {"step": -1}

    def lr(step, s):
        now["step"] = step
        return real_lr(step, s)

    def loss(model, inputs, targets, autocast=None):
        value = real_loss(model, inputs, targets, autocast)
        return value * float("nan") if now["step"] == step_index and torch.is_grad_enabled() else value

    monkeypatch.setattr(train_module, "learning_rate", lr)
    monkeypatch.setattr(train_module, "loss_of", loss)


def test_a_nan_loss_stops_training_naming_the_step_and_the_checkpoint_and_changes_nothing(
        corpus, at_step_2, whole, tmp_path, monkeypatch) -> None:
    out = copy_of(at_step_2, tmp_path / "run")
    before = tree(out)
    poisoned_at(3, monkeypatch)
    with pytest.raises(TrainingError, match=r"diverged at step 4: the loss is nan.*last good checkpoint, step 2"):
        run(corpus, out)
    assert tree(out) == before  # the checkpoint and the export, bit for bit
    # --skip-nonfinite: the step is logged as skipped and applies no update (AdamW counted 3 updates in 4 steps)
    state = run(corpus, out, skip_nonfinite=1)
    assert state["step"] == 4 and "skipped" in state["log"][3] and "loss" not in state["log"][3]
    assert [e["loss"] for e in state["log"][:3]] == losses(whole[0])[:3]
    optimizer = load_file(out / "training" / "optimizer-4.safetensors")
    assert optimizer["0.step"].item() == 3
    assert_export_is_committed(out)


def test_non_finite_weights_are_never_committed(corpus, at_step_2, tmp_path, monkeypatch) -> None:
    out = copy_of(at_step_2, tmp_path / "run")
    before = tree(out)
    real, calls = train_module.train_step, []

    def breaks_a_weight(model, *args):
        result = real(model, *args)
        calls.append(1)
        if len(calls) == 2:  # step 4, just before its save: a finite loss, an inf weight
            with torch.no_grad():
                model.blocks[0].mlp.fc.weight[0, 0] = float("inf")
        return result

    monkeypatch.setattr(train_module, "train_step", breaks_a_weight)
    with pytest.raises(TrainingError, match=r"weight blocks\.0\.mlp\.fc\.weight holds NaN or inf after step 4.*step 2"):
        run(corpus, out)
    assert tree(out) == before


def test_the_command_line_stops_a_diverging_run_with_exit_2(corpus, tmp_path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(asdict(CFG)))
    failed = cli("--data", str(corpus), "--size", str(config), "--out", str(tmp_path / "run"), "--steps", "4",
                 "--lr", "1e30", "--warmup", "0", "--save-every", "1", "--batch-size", "2", "--context", "16")
    assert failed.returncode == 2 and failed.stderr.startswith("error: "), failed.stderr[-2000:]
    assert "training diverged at step 2" in failed.stderr and "step 1" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert assert_export_is_committed(tmp_path / "run") == 1


def cli(*args: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))

    def limit() -> None:  # Python ignores SIGXFSZ: a write past the limit raises EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "minigpt", "train", *args, "--quiet", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=600,
                          preexec_fn=limit if limit_bytes is not None else None)


# Loading a run's directory


def test_loading_a_run_reads_the_committed_step_and_refuses_a_changed_one(at_step_2, whole, tmp_path) -> None:
    out = copy_of(at_step_2, tmp_path / "run")
    committed = GPT.from_pretrained(out).state_dict()
    (out / "model.safetensors").write_bytes(whole[1])  # an export that is not the committed step's
    loaded = GPT.from_pretrained(out)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in committed.items())
    assert "step 2 as committed" in loaded.provenance
    (out / "training" / "model-2.safetensors").write_bytes(whole[1])  # the committed file itself changed
    with pytest.raises(CheckpointError, match="does not have the sha256"):
        GPT.from_pretrained(out)
    state = json.loads((out / "training" / "state.json").read_text())
    (out / "training" / "state.json").write_text(json.dumps({**state, "step": "2"}))
    with pytest.raises(CheckpointError, match="'step' must be a positive integer"):
        GPT.from_pretrained(out)
    (out / "training" / "state.json").write_text(json.dumps({**state, "config_json": None}))
    with pytest.raises(CheckpointError, match="config_json"):
        GPT.from_pretrained(out)


# A kill at every point of a save


class Killed(BaseException):
    """Stands for SIGKILL: once raised, nothing more is written, renamed or removed (no clean-up runs)."""


class KillAt:
    """Counts the filesystem changes a save makes (renames, links, removals, directories) and dies at the n-th."""

    CALLS = ("replace", "rename", "link", "unlink", "rmdir", "mkdir")

    def __init__(self, n: int, monkeypatch):
        self.n, self.count, self.dead, self.armed = n, 0, False, False
        for name in self.CALLS:
            monkeypatch.setattr(os, name, self.wrap(getattr(os, name)))

    def wrap(self, real):
        def call(*args, **kwargs):
            if self.armed:
                self.count += 1
                if self.dead or self.count == self.n:
                    self.dead = True
                    raise Killed
            return real(*args, **kwargs)
        return call


FOREIGN = {"notes.tmp": b"mine", "training/mine-1.safetensors": b"mine too", "data/x.tmp": b"x",
           "training/.state.json.bak.minigpt-7.tmp": b"not minigpt's", "training/model-7": b"a file named as a staging dir"}


def test_killed_at_every_point_of_a_save_the_export_is_the_committed_step_and_the_run_finishes(
        corpus, at_step_2, whole, tmp_path, monkeypatch) -> None:
    step_2_weights = (at_step_2 / "model.safetensors").read_bytes()
    config = (at_step_2 / "config.json").read_bytes()
    real_save = checkpoint.save
    models, lagged = {}, 0  # step -> the model of that step's export; kills that left the export behind
    for step, weights in ((2, step_2_weights), (4, whole[1])):
        (tmp_path / f"step{step}").mkdir()
        (tmp_path / f"step{step}" / "model.safetensors").write_bytes(weights)
        (tmp_path / f"step{step}" / "config.json").write_bytes(config)
        models[step] = GPT.from_pretrained(tmp_path / f"step{step}").state_dict()
    for n in range(1, 100):
        out = copy_of(at_step_2, tmp_path / f"run{n}")
        for name, blob in FOREIGN.items():
            (out / name).write_bytes(blob)
        with monkeypatch.context() as m:
            killer = KillAt(n, m)

            def save(out_, model, optimizer, state, *args):
                killer.armed = state["step"] == 4
                try:
                    return real_save(out_, model, optimizer, state, *args)
                finally:
                    killer.armed = False

            m.setattr(checkpoint, "save", save)
            try:
                finished = run(corpus, out)
            except Killed:
                finished = None
        if not killer.dead:  # the save makes fewer changes than n: every point was tried
            assert n > 8 and losses(finished) == losses(whole[0])
            assert lagged, "no kill fell between the commit and the export"
            break
        committed = checkpoint.load_state(out)["step"]
        assert committed in (2, 4)
        assert (out / "model.safetensors").read_bytes() in (step_2_weights, whole[1])  # whole, one step or the other
        # Any command loading the directory sees the committed step, even before the export is repaired.
        lagged += (out / "model.safetensors").read_bytes() != (step_2_weights, whole[1])[committed == 4]
        loaded = GPT.from_pretrained(out).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in models[committed].items()), n
        # The same command makes the export the committed step's before anything else ...
        with monkeypatch.context() as m:
            m.setattr(train_module, "_data", lambda *a: (_ for _ in ()).throw(RuntimeError("stop")))
            with pytest.raises(RuntimeError, match="stop"):
                run(corpus, out)
        step = assert_export_is_committed(out)
        assert (out / "config.json").read_bytes() == config
        names = {p.name for p in (out / "training").iterdir()} - {Path(n).name for n in FOREIGN}
        assert names == {"state.json", *checkpoint.step_files(step, 1)}, n
        # ... and goes on to the uninterrupted run's losses and weights; nothing of anyone else's is removed.
        assert losses(run(corpus, out)) == losses(whole[0])
        assert (out / "model.safetensors").read_bytes() == whole[1]
        assert all((out / name).read_bytes() == blob for name, blob in FOREIGN.items())
        assert not [p for p in out.rglob("*.minigpt-*.tmp") if p.name != ".state.json.bak.minigpt-7.tmp"]
    else:
        pytest.fail("the save never finished")


# Foreign directories


def test_only_an_empty_or_new_directory_or_a_run_of_minigpts_is_written_into(corpus, tmp_path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    (theirs / ".x.minigpt-1.tmp").write_text("named like ours, not ours")
    with pytest.raises(TrainingError, match=r"holds files minigpt did not write \(\.x\.minigpt-1\.tmp, thesis\.tex\)"):
        run(corpus, theirs)
    assert sorted(p.name for p in theirs.iterdir()) == [".x.minigpt-1.tmp", "thesis.tex"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(TrainingError, match="is not a directory"):
        run(corpus, a_file)
    harvest = tmp_path / "harvest"
    harvest.mkdir()
    files.write_json(harvest / files.MARKER_FILE, {"format": files.MARKER_FORMAT, "kind": "harvest"})
    with pytest.raises(TrainingError, match="kind 'harvest'"):
        run(corpus, harvest)
    assert [p.name for p in harvest.iterdir()] == [files.MARKER_FILE]
    piped = tmp_path / "piped"
    piped.mkdir()
    os.mkfifo(piped / files.MARKER_FILE)
    with watchdog(60), pytest.raises(TrainingError, match="named pipe"):
        run(corpus, piped)
    empty = tmp_path / "empty"
    empty.mkdir()
    run(corpus, empty)
    assert json.loads((empty / files.MARKER_FILE).read_text())["kind"] == "train"


# Every file read on resume is checked


def forge(out: Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    """Replace a step file and its sha256 in state.json: the hash no longer protects it, the checks must."""
    save_file(tensors, out / "training" / name)
    state = json.loads((out / "training" / "state.json").read_text())
    state["files"][name] = sha256(out / "training" / name)
    (out / "training" / "state.json").write_text(json.dumps(state))


def edit_state(out: Path, change) -> None:
    state = json.loads((out / "training" / "state.json").read_text())
    change(state)
    (out / "training" / "state.json").write_text(json.dumps(state))


def fifo(out: Path, name: str) -> None:
    (out / name).unlink()
    os.mkfifo(out / name)


def wrong_shape(out: Path) -> None:
    tensors = load_file(out / "training" / "optimizer-2.safetensors")
    tensors["0.exp_avg"] = tensors["0.exp_avg"][:-1].clone()
    forge(out, "optimizer-2.safetensors", tensors)


def short_rng(out: Path) -> None:
    forge(out, "rng-2-rank0.safetensors", {"cpu": torch.zeros(100, dtype=torch.uint8)})


def nan_moment(out: Path) -> None:
    tensors = load_file(out / "training" / "optimizer-2.safetensors")
    tensors["3.exp_avg_sq"][0] = float("nan")
    forge(out, "optimizer-2.safetensors", tensors)


def odd_tokens(out: Path) -> None:
    with (out / "data" / "train.bin").open("ab") as f:
        f.write(b"\0")


def data_json(out: Path) -> None:
    meta = json.loads((out / "data" / "data.json").read_text())
    meta["train_tokens"] = -1
    (out / "data" / "data.json").write_text(json.dumps(meta))


def groups(state: dict) -> None:
    state["param_groups"][0]["eps"] = 1.0


@pytest.mark.parametrize("damage, message", [
    (lambda out: fifo(out, "training/state.json"), r"state\.json is a named pipe"),
    (lambda out: fifo(out, "data/train.bin"), r"train\.bin is a named pipe"),
    (lambda out: fifo(out, "training/rng-2-rank0.safetensors"), r"rng-2-rank0\.safetensors is a named pipe"),
    (lambda out: edit_state(out, lambda s: s.update(step="2")), r"state\.json: step must be an integer in \[1, 4\]"),
    (lambda out: edit_state(out, lambda s: s.update(step=9)), r"state\.json: step must be an integer in \[1, 4\]"),
    (lambda out: edit_state(out, lambda s: s.update(log=s["log"][:1])), r"state\.json: log must be a list of 2"),
    (lambda out: edit_state(out, lambda s: s["files"].pop("rng-2-rank0.safetensors")), r"state\.json: files must"),
    (lambda out: edit_state(out, groups), r"state\.json: param_groups\[0\]\.eps must be 1e-08"),
    (lambda out: edit_state(out, lambda s: s["config_json"].update(n_layer=3)), r"state\.json: config_json must be"),
    (wrong_shape, r"optimizer-2\.safetensors: 0\.exp_avg must be torch\.float32 of shape \[50257, 16\]"),
    (nan_moment, r"optimizer-2\.safetensors: 3\.exp_avg_sq must be finite"),
    (short_rng, r"rng-2-rank0\.safetensors: cpu must be torch\.uint8 of shape \[5056\]"),
    (odd_tokens, r"train\.bin holds [\d,]+ bytes, not [\d,]+ tokens"),
    (data_json, r"data\.json: train_tokens must be an integer"),
], ids=["state-fifo", "train-bin-fifo", "rng-fifo", "step-string", "step-range", "log", "files", "param-groups",
        "config-json", "tensor-shape", "nan-moment", "rng-size", "odd-tokens", "data-json"])
def test_every_file_read_on_resume_is_checked_before_it_is_trusted(corpus, at_step_2, tmp_path, damage,
                                                                    message) -> None:
    out = copy_of(at_step_2, tmp_path / "run")
    damage(out)
    with watchdog(60), pytest.raises(TrainingError, match=message):
        run(corpus, out)


# A full disk, a file-size limit


def test_a_full_disk_while_tokenizing_leaves_nothing_and_the_same_command_goes_on(corpus, whole, tmp_path,
                                                                                monkeypatch) -> None:
    real = files.write_atomically

    def full(path, write):
        if Path(path).name == "val.bin":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(files, "write_atomically", full)
    with pytest.raises(TrainingError, match=r"cannot write the tokenized corpus .*No space left on device"):
        run(corpus, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "data").iterdir()) == []
    monkeypatch.setattr(files, "write_atomically", real)
    assert losses(run(corpus, tmp_path / "run")) == losses(whole[0])


def test_a_full_disk_during_a_checkpoint_keeps_the_one_before_and_the_same_command_goes_on(
        corpus, at_step_2, whole, tmp_path, monkeypatch) -> None:
    out = copy_of(at_step_2, tmp_path / "run")
    before = tree(out)
    real = checkpoint.save_file

    def full(tensors, path, *args, **kwargs):
        if "optimizer-4" in str(path):
            Path(path).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(TrainingError, match=r"checkpoint of step 4 .*No space left.*last good checkpoint, step 2"):
        run(corpus, out)
    assert tree(out) == before  # step 4's files, whole or half written, are all gone
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert losses(run(corpus, out)) == losses(whole[0])
    assert (out / "model.safetensors").read_bytes() == whole[1]


def test_a_file_size_limit_during_a_checkpoint_is_an_error_and_the_same_command_goes_on(
        corpus, at_step_2, whole, tmp_path) -> None:
    out = copy_of(at_step_2, tmp_path / "run")
    before = tree(out)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(asdict(CFG)))
    options = [f"--{f.name.replace('_', '-')}={getattr(FAULT, f.name)}" for f in fields(Settings)]
    limit = len(before["model.safetensors"]) // 2  # the tokens and state.json fit, the weights do not
    failed = cli("--data", str(corpus), "--size", str(config), "--out", str(out), "--save-every", str(SAVE_EVERY),
                 *options, limit_bytes=limit)
    assert failed.returncode == 2 and failed.stderr.startswith("error: "), failed.stderr[-2000:]
    assert "File too large" in failed.stderr and "last good checkpoint, step 2" in failed.stderr
    assert tree(out) == before
    assert losses(run(corpus, out)) == losses(whole[0])
    assert (out / "model.safetensors").read_bytes() == whole[1]


def test_a_file_size_limit_while_tokenizing_is_an_error_that_leaves_nothing(corpus, tmp_path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(asdict(CFG)))
    args = ["--data", str(corpus), "--size", str(config), "--out", str(tmp_path / "run"), "--steps", "1",
            "--batch-size", "2", "--context", "16"]
    failed = cli(*args, limit_bytes=1000)  # the marker fits, the tokens do not
    assert failed.returncode == 2 and "cannot write the tokenized corpus" in failed.stderr, failed.stderr[-2000:]
    assert "File too large" in failed.stderr
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == [files.MARKER_FILE, "data"]
    assert cli(*args).returncode == 0
