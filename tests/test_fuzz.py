"""Fuzzing: ``model.run`` inputs, taps, edits and options; checkpoint bytes and directories. Only documented
errors may come out.

Each fuzzer draws ``FUZZ_EXAMPLES`` inputs: 20 x the profile's max_examples, i.e. 300 under the
"ci" profile (derandomized, so the same 300 every run) and 6000 under "dev". For each input an
independent oracle says whether it is valid; the fuzzer then asserts:
  * invalid -> the documented MiniGPTError subclass (or, for an edit that raises, that edit's own
    exception with a note naming the tap); never another exception type;
  * valid -> no error, and a result that is right (logits equal to a plain forward on the same ids,
    edits that change nothing change nothing bitwise, a loaded file equals what its header says);
  * after every input, failed or not, the weights are unchanged and a clean run is bitwise clean;
  * no input hangs: each runs under a watchdog alarm (a hang guard, not a timing assertion).
"""
from __future__ import annotations

import fnmatch
import json
import math
import signal
import struct
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from minigpt import (GPT, CheckpointError, EditError, GPTConfig, InputError, MiniGPTError, MiniGPTWarning,
                     TapError)
from minigpt.taps import ON_DEMAND
from minigpt.weights import from_hf_state_dict, read_safetensors

FUZZ_EXAMPLES = 20 * settings.default.max_examples
FUZZ = settings(max_examples=FUZZ_EXAMPLES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                   HealthCheck.filter_too_much])
WATCHDOG_SECONDS = 60


@contextmanager
def watchdog(seconds: int = WATCHDOG_SECONDS):
    """Fail (instead of hanging forever) if the body runs longer than ``seconds``."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


SMALL = GPTConfig(vocab_size=60, n_positions=10, n_embd=6, n_layer=2, n_head=2, n_inner=8)


@pytest.fixture(scope="module")
def small() -> tuple[GPT, dict]:
    model = GPT.random(SMALL, seed=2)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


CLEAN_TOKENS = torch.tensor([[5, 7, 11, 13]])


def assert_untouched(model: GPT, state: dict, clean_logits: torch.Tensor) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), f"weight {name} changed"
    assert all(p.grad is None for p in model.parameters())
    logits, trace = model.run(CLEAN_TOKENS)
    assert len(trace) == 0 and torch.equal(logits, clean_logits)


# ---------------------------------------------------------------------------------------------
# 1. Token inputs: lists, nested lists, tensors of every dtype and shape, text, junk

INT_DTYPES = [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32, torch.uint64]
OTHER_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool, torch.complex64]


def _valid(ids: torch.Tensor, cfg: GPTConfig) -> bool:
    """The oracle for an int64 tensor: [S] or [B, S], non-empty, fits the context and the vocabulary."""
    return (ids.dim() in (1, 2) and ids.numel() > 0 and ids.shape[-1] <= cfg.n_positions
            and bool(((ids >= 0) & (ids < cfg.vocab_size)).all()))


@st.composite
def token_inputs(draw) -> tuple[object, torch.Tensor | None]:
    """(input for run, the [B, S] int64 ids it stands for, or None if it must be refused)."""
    V, P = SMALL.vocab_size, SMALL.n_positions
    ids = st.integers(0, V - 1) | st.integers(-3, V + 3) | st.sampled_from([0, V - 1, V, -1, 2**31, -(2**63)])
    kind = draw(st.sampled_from(["good", "good", "list", "nested", "tensor", "tensor", "junk"]))
    if kind == "good":  # well-formed ids of some integer type, [S] or [B, S]
        shape = draw(st.sampled_from([[draw(st.integers(1, P))], [draw(st.integers(1, 3)), draw(st.integers(1, P))]]))
        values = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
        as_list = draw(st.booleans())
        return (values.tolist() if as_list else values.to(draw(st.sampled_from(INT_DTYPES))),
                values.view(-1, shape[-1]))
    if kind == "list":
        values = draw(st.lists(ids, max_size=P + 2) | st.lists(ids | st.integers(-(2**70), 2**70), max_size=P + 2))
        if not all(-(2**63) <= v < 2**63 for v in values):
            return values, None
        t = torch.tensor(values, dtype=torch.long).view(1, -1)
        return values, t if _valid(t, SMALL) else None
    if kind == "nested":
        rows = draw(st.lists(st.lists(ids, max_size=P + 1), max_size=3))
        if len({len(r) for r in rows}) > 1:  # ragged: padded, each row must be valid on its own
            singles = [torch.tensor(r, dtype=torch.long).view(1, -1) for r in rows]
            return rows, singles if all(_valid(t, SMALL) for t in singles) else None
        t = torch.tensor(rows, dtype=torch.long).view(len(rows), -1) if rows else torch.zeros(0, dtype=torch.long)
        return rows, t if _valid(t, SMALL) else None
    if kind == "tensor":
        dtype = draw(st.sampled_from(INT_DTYPES + OTHER_DTYPES))
        shape = draw(st.lists(st.integers(0, P + 1), max_size=3))
        low = 0 if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.bool) else draw(
            st.sampled_from([0, -3]))
        high = min(V + 3, 127) if dtype == torch.int8 else draw(st.sampled_from([V - 1, V + 3]))
        values = torch.randint(low, high + 1, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
        tensor = values.to(dtype)
        if draw(st.booleans()) and tensor.dim() == 2:
            tensor, values = tensor.t(), values.t()  # non-contiguous
        if dtype not in INT_DTYPES:
            return tensor, None
        return tensor, values.view(1, -1) if values.dim() == 1 and _valid(values, SMALL) else (
            values if _valid(values, SMALL) else None)
    junk = draw(st.sampled_from([None, 3, 2.5, "", [1.5, 2.0], [True, False], ["a", "b"], {"ids": [1]}, b"\x01",
                                 [[1, 2], []], ["a", [1]], [None], [[[1]]], object()]))
    if isinstance(junk, list) and junk == [[[1]]]:
        return junk, None  # 3-D
    return junk, None


@FUZZ
@given(case=token_inputs())
def test_fuzz_run_inputs(small, case):
    model, state = small
    inputs, expected = case
    clean_logits = model(CLEAN_TOKENS)
    event("refused" if expected is None else "valid")
    with watchdog():
        if expected is None:
            with pytest.raises(InputError):
                model.run(inputs)
        elif isinstance(expected, list):  # a ragged batch: each row's real positions as that row alone
            logits, trace = model.run(inputs)
            for row, single in enumerate(expected):
                n = single.shape[1]
                assert trace.mask[row].tolist() == [True] * n + [False] * (logits.shape[1] - n)
                torch.testing.assert_close(logits[row, :n], model(single)[0], rtol=1e-5, atol=1e-5)
        else:
            logits, _ = model.run(inputs)
            assert torch.equal(logits, model(expected)), "run gave a different result than the forward on the same ids"
    assert_untouched(model, state, clean_logits)


@pytest.fixture(scope="module")
def full_vocab() -> GPT:
    return GPT.random(GPTConfig(n_positions=12, n_embd=4, n_layer=1, n_head=1, n_inner=4), seed=3)


@FUZZ
@given(text=st.text(max_size=40))
def test_fuzz_run_text(full_vocab, text):
    ids = full_vocab.tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    with watchdog():
        if not text or not 1 <= len(ids) <= 12:
            with pytest.raises(InputError):
                full_vocab.run(text)
        else:
            logits, _ = full_vocab.run(text)
            assert torch.equal(logits, full_vocab(torch.tensor([ids])))


# ---------------------------------------------------------------------------------------------
# 2. Taps and edits: random names and patterns, edits returning anything

NAMES = GPT(SMALL).tap_names
PARTS = ["blocks", "*", "?", "[01]", "[!0]", "0", "1", "2", "99", "-1", "attn", "mlp", "embed", "logits", "ln_f",
         "resid_post", "resid_pre", "pattern", "scores", "heads", "q", "k", "z", "pre", "post", "ln1", "resid", ""]


@st.composite
def tap_specs(draw) -> str:
    kind = draw(st.sampled_from(["real"] * 10 + ["glob"] * 2 + ["typo", "noise"]))
    if kind == "real":
        return draw(st.sampled_from(NAMES))
    if kind == "typo":
        name = draw(st.sampled_from(NAMES))
        i = draw(st.integers(0, len(name) - 1))
        return name[:i] + draw(st.sampled_from(["", "x", ".", "*", "9"])) + name[i + 1:]
    if kind == "glob":
        return ".".join(draw(st.lists(st.sampled_from(PARTS), min_size=1, max_size=4)))
    return draw(st.text(alphabet="abcdeklmnoprstuz._*?[]!0129-", max_size=14))


def _matches(spec: str) -> list[str]:
    """The oracle for one name or pattern: the taps it selects ([] = must be refused)."""
    if any(c in spec for c in "*?["):
        return fnmatch.filter(NAMES, spec)
    return [spec] if spec in NAMES else []


class Boom(Exception):
    """An edit's own error."""


# Edit kinds: (the edit, what must happen when it runs: "same" changes nothing, "changes", or the error).
EDITS = {
    "identity": (lambda x: x, "same"),
    "clone": (lambda x: x.clone(), "same"),
    "times one": (lambda x: x * 1.0, "same"),
    "zeros": (torch.zeros_like, "changes"),
    "plus one": (lambda x: x + 1, "changes"),
    "nan": (lambda x: torch.full_like(x, float("nan")), "nan"),
    "None": (lambda x: None, EditError),
    "int": (lambda x: 3, EditError),
    "list": (lambda x: x.tolist(), EditError),
    "extra axis": (lambda x: x.unsqueeze(0), EditError),
    "one element": (lambda x: x.flatten()[:1], EditError),
    "float64": (lambda x: x.double(), EditError),
    "int64": (lambda x: x.long(), EditError),
    "meta device": (lambda x: torch.empty_like(x, device="meta"), EditError),
    "raises": (lambda x: (_ for _ in ()).throw(Boom("boom")), Boom),
    "not callable": (2.0, "static"),
    "wrong-shape tensor": (torch.zeros(3), EditError),
}


@st.composite
def run_calls(draw) -> dict:
    batch, seq = draw(st.integers(1, 2)), draw(st.integers(1, SMALL.n_positions))
    taps = draw(st.just("") | tap_specs() | st.lists(tap_specs(), max_size=2))
    edits = draw(st.dictionaries(tap_specs(), st.sampled_from(list(EDITS)), max_size=2))
    return dict(tokens=torch.randint(SMALL.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seq)),
                taps=taps, edits=edits)


def _expected_outcome(call: dict) -> tuple[object, list[str], dict[str, str]]:
    """The oracle for a run: (error type or None, taps recorded, {tap: edit kind})."""
    specs = [call["taps"]] if isinstance(call["taps"], str) else call["taps"]
    specs = [s for s in specs if s] if isinstance(call["taps"], str) else specs
    record = []
    for spec in specs:
        if not _matches(spec):
            return TapError, [], {}
        record += _matches(spec)
    edited: dict[str, str] = {}
    for spec, kind in call["edits"].items():
        if EDITS[kind][1] == "static":
            return EditError, [], {}
        if not _matches(spec):
            return TapError, [], {}
        for name in _matches(spec):
            if name in edited:
                return EditError, [], {}  # two patterns edit one tap
            edited[name] = kind
    for name in NAMES:  # edits run in forward order; the first failing one decides
        if name in edited and isinstance(EDITS[edited[name]][1], type):
            return EDITS[edited[name]][1], [], {}
    return None, sorted(set(record), key=NAMES.index), edited


@FUZZ
@given(call=run_calls())
def test_fuzz_run_taps_and_edits(small, call):
    model, state = small
    clean_logits = model(CLEAN_TOKENS)
    error, record, edited = _expected_outcome(call)
    edits = {spec: EDITS[kind][0] for spec, kind in call["edits"].items()}
    event(f"outcome: {error.__name__ if error else 'runs'}")
    with watchdog(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if error is not None:
            with pytest.raises(error) as info:
                model.run(call["tokens"], taps=call["taps"], edits=edits)
            if error is Boom:
                assert any("raised by the edit at tap" in n for n in info.value.__notes__)
            else:
                assert isinstance(info.value, MiniGPTError)
        else:
            logits, trace = model.run(call["tokens"], taps=call["taps"], edits=edits)
            assert list(trace) == record
            kinds = {EDITS[k][1] for k in edited.values()}
            nan_warned = any(issubclass(w.category, MiniGPTWarning) for w in caught)
            assert nan_warned == ("nan" in kinds), "NaN from an edit must warn, and only NaN/inf may"
            for name, kind in edited.items():
                if name in trace and kind == "zeros":
                    assert (trace[name] == 0).all(), "the trace must hold the edited value"
            if kinds <= {"same"}:
                # Edits that change nothing change nothing, bitwise, against the same computation path
                # (edits on on-demand taps compute attention in the open, which rounds differently).
                same_path = {name: (lambda x: x) for name in edited}
                reference, _ = model.run(call["tokens"], taps=record, edits=same_path)
                assert torch.equal(logits, reference)
                plain = model(call["tokens"])
                if not any(n.endswith(ON_DEMAND) for n in [*record, *edited]):
                    assert torch.equal(logits, plain)
                else:
                    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)
    assert_untouched(model, state, clean_logits)


# ---------------------------------------------------------------------------------------------
# 3. Checkpoint files: flipped header bytes, truncation, wrong lengths, offsets, shapes, dtypes

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
CKPT = dict(vocab_size=20, n_positions=6, n_embd=4, n_layer=1, n_head=2, n_inner=None, layer_norm_epsilon=1e-5,
            activation_function="gelu_new", scale_attn_by_inverse_layer_idx=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[bytes, str]:
    """(model.safetensors bytes, config.json text) of a small official-layout GPT-2."""
    from hf_reference import make_hf, write_checkpoint

    directory = write_checkpoint(make_hf(CKPT, seed=5, dtype=torch.float32), tmp_path_factory.mktemp("fuzz-ckpt"))
    return (directory / "model.safetensors").read_bytes(), (directory / "config.json").read_text()


def _split(raw: bytes) -> tuple[int, dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return n, json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@st.composite
def mutations(draw, raw: bytes) -> bytes:
    n, header, data = _split(raw)
    names = sorted(k for k in header if k != "__metadata__")
    kind = draw(st.sampled_from(["flip", "truncate", "length", "offsets", "shape", "dtype", "append", "rename",
                                 "data", "reshape", "retype", "metadata"]))
    if kind == "flip":  # flip bytes in the length prefix or the JSON header
        out = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, 8 + n - 1))
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "length":
        value = draw(st.integers(0, 2**64 - 1) | st.integers(max(0, n - 16), n + 16) | st.just(len(raw)))
        return struct.pack("<Q", value) + raw[8:]
    if kind == "append":
        return raw + draw(st.binary(min_size=1, max_size=64))
    if kind == "data":  # flip bytes of the tensors themselves: still a well-formed file
        out = bytearray(raw)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(8 + n, len(raw) - 1))
            out[i] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "metadata":
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5) | st.integers(), max_size=2)
                                      | st.sampled_from([None, [], "pt", 3]))
        return _join(header, data)
    name = draw(st.sampled_from(names))
    entry = header[name]
    if kind == "offsets":
        edge = st.integers(-4, len(data) + 4) | st.sampled_from([0, len(data), 2**63, 2**64 - 1])
        entry["data_offsets"] = draw(st.lists(edge, min_size=2, max_size=2) | st.lists(edge, max_size=3))
    elif kind == "shape":
        entry["shape"] = draw(st.lists(st.integers(0, 40) | st.sampled_from([-1, 2**40, 2**64 - 1]), max_size=3))
    elif kind == "dtype":
        entry["dtype"] = draw(st.sampled_from([*ST_DTYPES, "X32", "", "f32", "F4", "C64"]))
    elif kind == "reshape":  # same number of values, other shape: a well-formed file
        count = math.prod(entry["shape"])
        entry["shape"] = draw(st.sampled_from([[count], [1, count], [count, 1], list(reversed(entry["shape"]))]))
    elif kind == "retype":  # same bytes read as another 4-byte type: a well-formed file
        entry["dtype"] = draw(st.sampled_from(["I32", "U32", "F32"]))
    else:  # rename
        header[draw(st.sampled_from(["wte.bias", "h.1.ln_1.weight", "__metadata__", ""]))] = header.pop(name)
    return _join(header, data)


def _assert_matches_header(raw: bytes, tensors: dict[str, torch.Tensor]) -> None:
    """A successful read must hold exactly the tensors the header describes, byte for byte."""
    n, header, data = _split(raw)
    described = {k: v for k, v in header.items() if k != "__metadata__"}
    assert tensors.keys() == described.keys()
    for name, info in described.items():
        t = tensors[name]
        begin, end = info["data_offsets"]
        assert t.dtype == ST_DTYPES[info["dtype"]] and list(t.shape) == info["shape"]
        assert end - begin == math.prod(info["shape"]) * t.element_size()
        assert bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) == data[begin:end]


@FUZZ
@given(data=st.data())
def test_fuzz_checkpoint_files(checkpoint, data):
    raw, config = checkpoint
    spoiled = data.draw(mutations(raw))
    if data.draw(st.booleans()):
        spoiled = data.draw(mutations(spoiled)) if len(spoiled) >= 8 and _parses(spoiled) else spoiled
    with tempfile.TemporaryDirectory() as tmp, watchdog(), warnings.catch_warnings():
        warnings.simplefilter("ignore", MiniGPTWarning)  # NaN weights from flipped data bytes may warn
        directory = Path(tmp)
        (directory / "config.json").write_text(config)
        (directory / "model.safetensors").write_bytes(spoiled)
        try:
            tensors = read_safetensors(directory / "model.safetensors")
        except CheckpointError:
            tensors = None
            event("file refused")
        else:
            event("file read")
            _assert_matches_header(spoiled, tensors)
        try:
            model = GPT.from_pretrained(directory)
        except CheckpointError:
            event("load refused")
            return
        event("load succeeded")
        assert tensors is not None
        expected = from_hf_state_dict(tensors, model.cfg, GPT.parameter_shapes)
        for name, value in model.state_dict().items():  # flipped data bytes may well make a NaN
            torch.testing.assert_close(value, expected[name].to(value.dtype), rtol=0, atol=0, equal_nan=True)


def _parses(raw: bytes) -> bool:
    try:
        _split(raw)
        return True
    except (ValueError, UnicodeDecodeError, struct.error):
        return False


# ---------------------------------------------------------------------------------------------
# 4. Checkpoint directories: absurd configs, files that are not files, links, a tensor twice

ABSURD = {"n_layer": [10**9, 2**62], "n_embd": [2**40, 10**12], "vocab_size": [10**12, 2**61],
          "n_positions": [10**15], "n_inner": [10**13, 2**62]}
FILE_KINDS = ["regular", "pipe", "directory", "link inside", "link outside", "missing", "empty index",
              "index to a pipe"]


@st.composite
def directories(draw) -> dict:
    config = dict(draw(st.dictionaries(st.sampled_from(list(ABSURD)), st.just(None), max_size=2)))
    for key in config:
        config[key] = draw(st.sampled_from(ABSURD[key]))
    if "n_embd" in config:
        config["n_head"] = 1
    return dict(config=config, kind=draw(st.sampled_from(FILE_KINDS)), twin=draw(st.sampled_from([None, "equal",
                                                                                                 "different"])))


def _build(directory: Path, outside: Path, case: dict, raw: bytes, config: str) -> None:
    import os

    (directory / "config.json").write_text(json.dumps({**json.loads(config), **case["config"]}))
    if case["twin"]:
        from safetensors.torch import load, save
        tensors = load(raw)
        twin = tensors["h.0.ln_1.weight"].clone() + (0 if case["twin"] == "equal" else 1)
        raw = save({**tensors, "transformer.h.0.ln_1.weight": twin})
    weights = directory / "model.safetensors"
    kind = case["kind"]
    if kind in ("regular", "link inside"):
        target = directory / ("real.safetensors" if kind == "link inside" else "model.safetensors")
        target.write_bytes(raw)
        if kind == "link inside":
            weights.symlink_to(target.name)
    elif kind == "pipe":
        os.mkfifo(weights)
    elif kind == "directory":
        weights.mkdir()
    elif kind == "link outside":
        (outside / "w.safetensors").write_bytes(raw)
        weights.symlink_to(outside / "w.safetensors")
    elif kind == "empty index":
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    elif kind == "index to a pipe":
        os.mkfifo(directory / "a.safetensors")
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"wte.weight": "a.safetensors"}}))


@FUZZ
@given(case=directories())
def test_fuzz_checkpoint_directories(checkpoint, case):
    raw, config = checkpoint
    loads = not case["config"] and case["kind"] in ("regular", "link inside") and case["twin"] != "different"
    event("loads" if loads else "refused")
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as elsewhere, watchdog(30):
        directory = Path(tmp)
        _build(directory, Path(elsewhere), case, raw, config)
        if loads:
            model = GPT.from_pretrained(directory)
            assert model.cfg.n_layer == CKPT["n_layer"]
        else:
            with pytest.raises(CheckpointError):
                GPT.from_pretrained(directory)


# ---------------------------------------------------------------------------------------------
# 5. Run options: positions, stop_at, attention masks, grad with keep options


@st.composite
def run_options(draw) -> tuple[dict, bool]:
    """(keyword arguments for run on a [2, 5] batch, whether they are valid)."""
    S, valid, options = 5, True, {}
    positions = draw(st.sampled_from([None, "last", [-1], [0, 4], slice(1, 3), 3, "first", [], [5], slice(5, 9)]))
    if positions is not None:
        options["keep_positions"] = positions
        valid &= positions in ("last", [-1], [0, 4]) or positions == slice(1, 3)
    stop = draw(st.sampled_from([None, "blocks.1.resid_post", "blocks.0.attn.pattern", "ln_f", "blocks.*", "nope"]))
    if stop is not None:
        options["stop_at"] = stop
        valid &= stop not in ("blocks.*", "nope")
    mask = draw(st.sampled_from([None, "ones", "left", "right", "empty row", "wrong shape", "twos"]))
    if mask is not None:
        options["attention_mask"] = {
            "ones": torch.ones(2, S, dtype=torch.long), "left": torch.tensor([[0, 0, 1, 1, 1], [1] * 5]),
            "right": torch.tensor([[1, 1, 1, 0, 0], [1] * 5]), "empty row": torch.tensor([[0] * 5, [1] * 5]),
            "wrong shape": torch.ones(2, S + 1), "twos": torch.full((2, S), 2)}[mask]
        valid &= mask in ("ones", "left", "right")
    grad = draw(st.booleans())
    keep = draw(st.sampled_from([{}, {"store_dtype": torch.bfloat16}, {"to": "cpu"}, {"store_dtype": torch.int32}, {"to": "x"}]))
    options |= keep | {"grad": grad}
    valid &= "store_dtype" not in keep or keep["store_dtype"].is_floating_point
    valid &= keep.get("to", "cpu") == "cpu"
    valid &= not (grad and (keep or positions is not None))
    return options, valid


@FUZZ
@given(case=run_options())
def test_fuzz_run_options(small, case):
    model, state = small
    options, valid = case
    clean_logits = model(CLEAN_TOKENS)
    tokens = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    event("valid" if valid else "refused")
    with watchdog():
        if not valid:
            with pytest.raises(MiniGPTError):
                model.run(tokens, taps="blocks.*.resid_post", **options)
        else:
            logits, trace = model.run(tokens, taps="blocks.*.resid_post", **options)
            assert (logits is None) == ("stop_at" in options)
            stop = options.get("stop_at")
            expected = [n for n in NAMES if fnmatch.fnmatch(n, "blocks.*.resid_post")
                        and (stop is None or NAMES.index(n) <= NAMES.index(stop))]
            assert list(trace) == expected
            positions = options.get("keep_positions")
            if positions is None:
                kept = 5
            elif positions == "last":
                kept = 1
            else:
                kept = len(range(5)[positions]) if isinstance(positions, slice) else len(positions)
            assert all(value.shape[1] == kept for value in trace.values())
    assert_untouched(model, state, clean_logits)
