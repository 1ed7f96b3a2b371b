"""Generated bad input never ends in a traceback: configs, overrides, files and CLI arguments either
work or give one `error:` line and exit 2 (nothing else escapes the error boundary)."""

from __future__ import annotations

import ast
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import inference
from data import prepare_dataset
import train_single
from conftest import tiny_overrides
from models.config_checks import ConfigError
from models.config_loader import MOVED, load_config, valid_keys
from utils.errors import one_line

NASTY_NUMBERS = st.one_of(st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
                          st.sampled_from(["nan", "inf", "-inf", "1e-3", "1e309", "0x10", "", " ", "2.5", "-0"]))
VALUES = st.one_of(NASTY_NUMBERS, st.text(max_size=30), st.text(min_size=5000, max_size=6000),
                   st.sampled_from(["true", "false", "yes", "null", "[1, 2]", "{a: 1}"]))
KEYS = st.one_of(st.sampled_from(valid_keys() + list(MOVED)), st.text(max_size=20))
OVERRIDES = st.one_of(st.builds(lambda k, v: f"{k}={v}", KEYS, VALUES), st.text(max_size=20))
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@SETTINGS
@given(overrides=st.lists(OVERRIDES, max_size=4))
def test_generated_overrides_load_or_raise_config_error(overrides):
    """No generated override list raises anything but ConfigError."""
    try:
        load_config(None, overrides)
    except ConfigError as e:
        assert str(e)


YAML_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), NASTY_NUMBERS, st.text(max_size=10)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=8)
YAML_DOCS = st.dictionaries(st.sampled_from(["model", "train", "optim", "eval", "paths", "bogus"]),
                            st.one_of(YAML_VALUES, st.dictionaries(st.sampled_from(
                                [k.split(".", 1)[1] for k in valid_keys()] + ["lr", "nope"]), YAML_VALUES,
                                max_size=3)), max_size=3)


@SETTINGS
@given(content=st.one_of(st.binary(max_size=200), YAML_DOCS.map(lambda d: __import__("yaml").safe_dump(d).encode()),
                         st.text(max_size=200).map(str.encode)))
def test_generated_config_files_load_or_raise_config_error(content):
    """Random bytes, non-UTF-8 files and odd YAML documents load or raise ConfigError, never else."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_bytes(content)
        try:
            load_config(path)
        except ConfigError as e:
            assert str(e)


@given(st.text().filter(lambda t: "\\" not in t))
def test_a_message_quoting_any_text_stays_one_line(text):
    """The error boundary's line stays one line whatever user text it quotes (a path holding U+0085 or
    U+2028 split it before: str.splitlines breaks on more than newlines), shows every character as itself or
    as its escape (a NUL, a control, an unpaired surrogate), and nothing is lost from it."""
    line = one_line(f"error: {text}")
    assert len(line.splitlines()) == 1 and line.isprintable()
    back = re.sub(r"\\(x..|u....|U........|[tnr])", lambda m: ast.literal_eval(f'"\\{m[1]}"'), line)
    assert back == f"error: {text}"


def absurd_yaml(kind: str, size: int, key: str) -> bytes:
    """A config file that parses (or nearly) into something no config can be."""
    section, name = key.split(".", 1)
    if kind == "nesting":
        return f"{section}: {'[' * size}{']' * size}\n".encode()
    if kind == "mapping nesting":
        return ("{a: " * size + "1" + "}" * size).encode()
    if kind == "digits":
        return f"{section}:\n  {name}: {'9' * (size + 4300)}\n".encode()
    if kind == "NUL":
        return f'{section}:\n  {name}: "x\\0y"\n'.encode()
    if kind == "lone surrogate":
        return f'{section}:\n  {name}: "\\ud{size % 1024 + 0x800:03x}"\n'.encode()
    return f"{section}:\n  {name}: \xff\xfe\n".encode("latin-1")  # undecodable bytes


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["nesting", "mapping nesting", "digits", "NUL", "lone surrogate", "undecodable"]),
       size=st.integers(600, 6000), key=st.sampled_from(valid_keys()))
def test_absurd_config_files_are_one_line(capsys, tmp_path, kind, size, key):
    """Nesting thousands deep, integers of thousands of digits, NUL, unencodable or undecodable text in any
    key: the training entry point exits 2 with one line, before anything is written."""
    path = tmp_path / "absurd.yaml"
    path.write_bytes(absurd_yaml(kind, size, key))
    code = train_single.main(["--config", str(path), f"checkpoint.dir={tmp_path}/run"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert not (tmp_path / "run").exists()


def assert_one_line_or_success(code: int, err: str) -> None:
    assert code in (0, 2), err
    if code == 2:
        lines = err.strip().splitlines()
        assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err


RUN_KEYS = ["model.dim", "model.n_layers", "model.n_heads", "model.context_length", "model.vocab_size",
            "model.dropout", "train.batch_size", "train.grad_accum_steps", "train.seed", "train.precision",
            "eval.max_bytes", "eval.sample_prompt", "eval.sample_tokens", "optim.lr", "schedule.warmup_steps",
            "checkpoint.keep_last", "data.dir"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(RUN_KEYS), value=st.one_of(
    st.integers(-5, 300).map(str), st.floats(allow_nan=True, allow_infinity=True, width=16).map(str),
    st.sampled_from(["nan", "inf", "1e-3", "", "2.5", "-0", "10**9"]), st.text(max_size=12)))
def test_generated_training_runs_finish_or_exit_2(capsys, tiny_data, key, value):
    """A real (1-step) training run with one generated override trains or exits 2 with one line.

    Values stay small where they set the amount of work (huge ones are checked without running)."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = tiny_overrides(tiny_data, Path(tmp), train__max_steps=1, eval__sample_tokens=2) + [f"{key}={value}"]
        code = train_single.main(argv)
        assert_one_line_or_success(code, capsys.readouterr().err)


@pytest.fixture
def checkpoint(tiny_run) -> Path:
    return tiny_run / "ckpt/best_model.pt"


ARG_VALUES = st.one_of(NASTY_NUMBERS, st.integers(-3, 12).map(str), st.text(max_size=6),
                       st.floats(0, 1e-30).map(repr), st.integers(2 ** 63, 2 ** 80).map(str))
SMALL = st.one_of(st.integers(-2, 4).map(str), st.text(max_size=4), st.sampled_from(["nan", "1e3", ""]))
# small amounts of work, or amounts no memory holds (refused before any allocation)
FLAGS = st.one_of(st.tuples(st.sampled_from(["--temperature", "--top-k", "--top-p", "--seed", "--stop", "--precision",
                                             "--device"]), ARG_VALUES),
                  st.tuples(st.sampled_from(["--max-new-tokens", "--num-samples"]),
                            st.one_of(SMALL, st.integers(10 ** 13, 10 ** 30).map(str))))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(flags=st.lists(FLAGS, max_size=3))
def test_generated_inference_arguments_sample_or_exit_2(capsys, checkpoint, flags):
    """inference.py with generated flag values samples or exits 2 with one line."""
    argv = ["--checkpoint", str(checkpoint), "--prompt", "ab", "--max-new-tokens", "3"]
    for flag, value in flags:
        argv += [flag, str(value)]
    code = inference.main(argv)
    assert_one_line_or_success(code, capsys.readouterr().err)


@pytest.mark.parametrize("override", ["model.dim=1048576", "model.n_layers=100000000", "model.context_length=10**12",
                                      "model.ffn_dim=4000000000"])
def test_a_model_too_large_for_memory_is_refused_before_any_allocation(capsys, tiny_data, tmp_path, override):
    """Absurd sizes are refused at once, from the shapes alone, with the keys to lower."""
    code = train_single.main([*tiny_overrides(tiny_data, tmp_path), override])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and ("GiB free" in err or "must be int" in err), err


def test_fsdp_asks_each_rank_for_its_shard_of_the_training_state(tiny_data, tmp_path):
    """16 bytes per parameter on every rank under DDP; under FSDP a rank holds 1/world size of them, so a
    model that one rank cannot hold whole is accepted once sharded over enough ranks."""
    import os

    import torch

    from utils.distributed.process_group import DistInfo
    from utils.train.preflight import check_memory, state_bytes_per_rank

    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    per_layer = 16 * 12 * 1024 ** 2  # bytes per layer at dim 1024, ffn 4096: 12 dim^2 weights
    layers = 2 * free // per_layer + 1  # about twice the free memory
    def cfg(strategy):
        return load_config(None, [*tiny_overrides(tiny_data, tmp_path), "model.dim=1024", "model.ffn_dim=4096",
                                  "model.n_heads=8", f"model.n_layers={layers}", f"distributed.strategy={strategy}"])
    ddp, fsdp = cfg("ddp"), cfg("fsdp")
    n, whole = state_bytes_per_rank(ddp, 4)
    assert whole >= 16 * n and state_bytes_per_rank(fsdp, 4) == (n, -(-16 * n // 4))
    four_ranks = DistInfo(0, 0, 4, torch.device("cpu"), "gloo")
    with pytest.raises(ConfigError, match="GiB per rank.*or shard them with distributed.strategy=fsdp"):
        check_memory(ddp, four_ranks)
    check_memory(fsdp, four_ranks)  # about half the free memory per rank


@pytest.mark.parametrize("device", ["tpu", "meta", "cuda:99", "mps", "xla", "garbage", "", "cpu:3"])
def test_unknown_or_unavailable_device_is_one_line(capsys, tiny_data, tmp_path, device):
    """--device names only the devices this code supports and that are present."""
    code = train_single.main(["--device", device, *tiny_overrides(tiny_data, tmp_path, train__max_steps=1)])
    err = capsys.readouterr().err
    if device == "cpu:3":  # torch accepts an index on the CPU; it is the same CPU
        assert code == 0, err
    else:
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


# what a shell hands Python for bytes that are not UTF-8: lone surrogates U+DC80-U+DCFF (surrogateescape)
ARGV_TEXT = st.text(st.one_of(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                              st.integers(0xDC80, 0xDCFF).map(chr)), max_size=8)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(separator=ARGV_TEXT, field=ARGV_TEXT, shard_size=st.one_of(ARGV_TEXT, st.integers(-5, 10 ** 40).map(str)))
def test_generated_preparation_arguments_prepare_or_exit_2(capsys, tmp_path_factory, separator, field, shard_size):
    """data/prepare_dataset.py with generated (also undecodable) separator, field and shard size."""
    tmp = tmp_path_factory.mktemp("prep")
    source = tmp / "docs.jsonl"
    source.write_text('{"text": "one document"}\n{"text": "another document, longer than the first"}\n' * 40)
    code = prepare_dataset.main(["--input", str(source), "--out", str(tmp / "out"), "--separator", separator,
                                 "--text-field", field, "--shard-size", shard_size])
    assert_one_line_or_success(code, capsys.readouterr().err)


# -- arguments at their limits: numbers, contradictory pairs, undecodable paths --------------------------
SCRIPT_SOURCES = ["inference.py", "train_single.py", "train_ddp.py", "data/prepare_dataset.py", "utils/train/cli.py",
                  *map(str, sorted(Path(__file__).parents[1].glob("scripts/*.py"))),
                  *map(str, sorted(Path(__file__).parents[1].glob("dev/*.py")))]


def test_every_numeric_argument_is_validated_by_the_shared_parser():
    """No script parses a number with a bare int or float: each goes through utils.errors.number (finite, in
    range, its unit named)."""
    root = Path(__file__).parents[1]
    bare = [f"{path}:{node.lineno}" for path in SCRIPT_SOURCES for node in ast.walk(ast.parse((root / path).read_text()))
            if isinstance(node, ast.keyword) and node.arg == "type" and isinstance(node.value, ast.Name)
            and node.value.id in ("int", "float")]
    assert not bare, bare


@SETTINGS
@given(kind=st.sampled_from([int, float]), low=st.integers(-5, 5), span=st.integers(0, 10 ** 6),
       above=st.booleans(), text=NASTY_NUMBERS.map(str))
def test_a_number_argument_is_finite_in_range_and_whole_where_a_count_is_meant(kind, low, span, above, text):
    """Whatever the text, the shared number type returns a finite value of its kind within its bounds, or
    refuses with a message naming the bounds and the unit."""
    import argparse

    from utils.errors import number

    parse = number(kind, low, low + span, "widgets", above=above)
    try:
        value = parse(text)
    except argparse.ArgumentTypeError as e:
        assert "widgets" in str(e) and "\n" not in str(e)
        return
    assert type(value) is kind and (low < value if above else low <= value) and value <= low + span


@pytest.mark.parametrize("module, argv, says", [
    ("scripts.plot_runs", ["runs", "--size", "nanx4"], "argument --size: must be a number above 0"),
    ("scripts.plot_runs", ["runs", "--dpi", "1e9"], "argument --dpi: must be a whole number from 1 to 1,200 (dots per inch)"),
    ("scripts.plot_runs", ["runs", "--ymax", "nan"], "argument --ymax: must be a number above 0"),
    ("scripts.plot_runs", ["runs", "--size", "90x4", "--dpi", "1000"], "matplotlib draws fewer than 65,536"),
    ("scripts.plan", ["--device-memory", "0.5"], "--device-memory '0.5' is not a size from 1MiB to 1EiB"),
    ("scripts.plan", ["--world-size", "1.5"], "argument --world-size: must be a whole number"),
    ("scripts.plan", ["--peak-tflops", "inf"], "argument --peak-tflops: must be a number above 0"),
    ("scripts.evaluate", ["--batch-size", "0.5"], "argument --batch-size: must be a whole number from 1"),
    ("scripts.evaluate", ["--max-bytes", "-1"], "argument --max-bytes: must be a whole number from 0"),
    ("scripts.benchmark", ["--steps", "1e300"], "argument --steps: must be a whole number from 1"),
    ("scripts.benchmark", ["--baseline-tokens-per-sec", "nan"], "argument --baseline-tokens-per-sec: must be a number"),
    ("scripts.benchmark_data", ["--startup-runs", "inf"], "argument --startup-runs: must be a whole number"),
    ("data.prepare_dataset", ["--val-fraction", "nan"], "argument --val-fraction: must be a number above 0"),
    ("data.prepare_dataset", ["--test-bytes", "1e300"], "argument --test-bytes: must be a whole number from 2"),
    ("data.prepare_dataset", ["--progress-every", "inf"], "argument --progress-every: must be a number from 0"),
    ("inference", ["--prompt", "a", "--max-new-tokens", "2.5"], "argument --max-new-tokens: must be a whole number"),
    ("inference", ["--prompt", "a", "--temperature", "inf"], "argument --temperature: must be a number from 0"),
    ("inference", ["--prompt", "a", "--seed", str(2 ** 64)], "argument --seed: must be a whole number from 0"),
    ("dev.ablate", ["--config", "c", "--variant", "a", "--budget", "inf"], "argument --budget: must be a number above 0"),
    ("dev.ablate", ["--config", "c", "--variant", "a", "--budget", "1", "--seeds", "1.5"], "argument --seeds: must be"),
    ("dev.record", ["--out", "o", "--run", "a=c", "--nproc", "0"], "argument --nproc: must be a whole number from 1"),
    ("dev.vs_nanogpt", ["--nanogpt", "n", "--rounds", "nan"], "argument --rounds: must be a whole number from 1"),
    ("dev.plan_check", ["--steps", "1e9"], "argument --steps: must be a whole number from 2"),
    # contradictory pairs
    ("inference", ["--prompt", "a", "--prompt-file", "p.txt"], "give the prompt once: --prompt or --prompt-file"),
    ("inference", ["--prompt", "a", "--temperature", "0", "--top-k", "5"], "--temperature 0 is greedy decoding"),
    ("scripts.evaluate", ["--text-file", "t.txt", "--data-dir", "d"], "--data-dir names the dataset of --split"),
    ("scripts.benchmark", ["--rounds", "3"], "--rounds alternates the cases of --compare"),
    ("scripts.benchmark", ["--compare", "--baseline-tokens-per-sec", "5"], "--baseline-tokens-per-sec rates a run"),
    # paths that are not UTF-8 (the bytes a shell passes, as Python keeps them)
    ("scripts.convert_checkpoint", ["--checkpoint", "c.pt", "--out", "caf\udce9.pt"], "argument --out: byte 0xe9"),
    ("inference", ["--checkpoint", "caf\udce9.pt", "--prompt", "a"], "argument --checkpoint: byte 0xe9 at position 3"),
    ("data.prepare_dataset", ["--out", "d\udcff"], "argument --out: byte 0xff at position 1 is not UTF-8"),
    ("train_single", ["--resume", "\udce9"], "argument --resume: byte 0xe9 at position 0 is not UTF-8"),
    ("scripts.plot_runs", ["runs", "--title", "caf\udce9"], "argument --title: byte 0xe9 at position 3"),
])
def test_bad_arguments_are_one_line_before_any_work(capsys, tmp_path, monkeypatch, module, argv, says):
    """Numbers out of range or not finite, contradictory pairs and undecodable paths: exit 2, one line, nothing
    written (the command runs in an empty folder)."""
    import importlib

    monkeypatch.chdir(tmp_path)
    code = importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["logging.dir", "checkpoint.dir", "data.dir", "train.init_from", "logging.wandb_name"])
def test_a_path_in_the_config_that_is_not_utf8_is_refused_before_anything_is_written(capsys, tiny_data, tmp_path,
                                                                                      key):
    """A Latin-1 byte in a path key: one line naming the key, exit 2, and no folder created (TensorBoard and
    torch.save would fail on it only after the run had written)."""
    value = tmp_path / "caf\udce9"
    code = train_single.main([*tiny_overrides(tiny_data, tmp_path / "run"), f"{key}={value}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {key} cannot be used: byte 0xe9 at position") and \
        err.count("\n") == 1, err
    assert not (tmp_path / "run").exists() and not value.exists()


def test_a_sharded_folder_whose_weights_are_another_shape_is_one_line(capsys, tmp_path):
    """A sharded folder whose extra.pt describes another model than its shards hold: converting, sampling and
    resuming name the differing weights in one line (DCP's own error is a traceback in a BaseException)."""
    import torch

    from models.config_loader import config_to_dict
    from models.transformer import GPT
    from scripts import convert_checkpoint
    from utils.checkpoint import sharded
    from utils.checkpoint.format import CONFIG, FORMAT, FORMAT_VERSION, TRAINER, CheckpointError

    def cfg(dim):
        return load_config(None, [f"model.dim={dim}", "model.n_layers=1", "model.n_heads=2", "model.ffn_dim=64",
                                  "model.context_length=16"])
    model = GPT(cfg(32).model)
    optimizer = torch.optim.AdamW(model.parameters())
    folder = tmp_path / "step_0000001"
    sharded.save_sharded(folder, model, optimizer, {CONFIG: config_to_dict(cfg(32)), FORMAT: FORMAT_VERSION,
                                                    TRAINER: {"step": 1}})
    torch.save({CONFIG: config_to_dict(cfg(64)), FORMAT: FORMAT_VERSION, TRAINER: {"step": 1}}, folder / "extra.pt")
    for main, argv in ((convert_checkpoint.main, ["--checkpoint", folder, "--out", tmp_path / "m.pt"]),
                       (inference.main, ["--checkpoint", folder, "--prompt", "a", "--max-new-tokens", "1"])):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {folder} holds a different model shape: tok_emb.weight: checkpoint (256, 32) "
                              f"vs model (256, 64);") and err.count("\n") == 1, err
    big = GPT(cfg(64).model)
    with pytest.raises(CheckpointError, match="holds a different model shape"):
        sharded.load_sharded(folder, big, torch.optim.AdamW(big.parameters()))
    assert not (tmp_path / "m.pt").exists()
