"""Every bad argument of the command line is one line naming it and what it must be, exit 2, before
anything is loaded: numeric flags are checked by argparse, settings by their config's fields."""

from __future__ import annotations

import json

import pytest

from moekit.cli import build_parser, main
from moekit.cli.common import resolve_config
from moekit.cli.convert import shard_bytes
from moekit.config import (
    AnalyzeConfig,
    CacheSimConfig,
    ConvertConfig,
    GenerateConfig,
    ModelConfig,
    OffloadConfig,
    QuantizeConfig,
    RunConfig,
    UpcycleConfig,
)
from moekit.overrides import check_nothing_lost

RUN = "no-such-run"  # never read: the argument fails first

BAD = [
    (["generate", RUN, "--max_new_tokens=-3"], "max_new_tokens=-3", "integer >= 1"),
    (["generate", RUN, "--max_new_tokens=0"], "max_new_tokens=0", "integer >= 1"),
    (["generate", RUN, "--max_new_tokens=ten"], "--max_new_tokens='ten'", "expected int"),
    (["generate", RUN, "--temperature=-0.5"], "temperature=-0.5", "must be >= 0"),
    (["generate", RUN, "--temperature=nan"], "temperature=nan", "must be >= 0"),
    (["generate", RUN, "--temperature=inf"], "temperature=inf", "must be >= 0"),
    (["generate", RUN, "--top_k=-1"], "top_k=-1", "integer >= 0 or None"),
    (["generate", RUN, "--top_p=0"], "top_p=0.0", "(0, 1]"),
    (["generate", RUN, "--top_p=1.5"], "top_p=1.5", "(0, 1]"),
    (["generate", RUN, "--seed=-1"], "seed=-1", "[0, 2**64)"),
    (["generate", RUN, f"--seed={2**64}"], f"seed={2**64}", "[0, 2**64)"),
    (["generate", RUN, "--offload.policy=fifo"], "--offload.policy='fifo'", "'lru', 'lfu'"),
    (["trace", RUN, "--prompts", "p", "--out", "o", "--max_new_tokens=0"], "max_new_tokens=0",
     "integer >= 1"),
    (["params", "tiny", "--ep", "0"], "argument --ep: ", "integer >= 1"),
    (["convert", "--to-hf", RUN, "--arch", "mixtral", "--out", "o", "--max_shard_size=0"],
     "max_shard_size='0'", "size above 0"),
    (["convert", "--to-hf", RUN, "--arch", "mixtral", "--out", "o", "--max_shard_size=lots"],
     "max_shard_size='lots'", "size above 0"),
    (["convert", "--from-hf", RUN, "--out", "o", "--dtype=float8"], "--dtype='float8'",
     "'bfloat16'"),
    (["convert", "--to-hf", RUN, "--arch", "mixtral", "--out", "o", "--layout=stacked"],
     "--layout='stacked'", "'per_expert', 'fused'"),
    (["demo", "--max_new_tokens=0"], "argument --max_new_tokens: ", "integer >= 1"),
    (["analyze", RUN, "--tokens=0"], "tokens=0", "integer >= 1"),
    (["analyze", RUN, "--seq_len=-1"], "seq_len=-1", "integer >= 2"),
    (["analyze", RUN, "--seq_len=1"], "seq_len=1", "integer >= 2"),  # repetition: pairs
    (["upcycle", RUN, "--out", "o", "--n_experts=0"], "n_experts=0", "integer >= 1"),
    (["upcycle", RUN, "--out", "o", "--top_k=0"], "top_k=0", "integer >= 1"),
    (["upcycle", RUN, "--out", "o", "--top_k=9"], "top_k=9", "<= n_experts (8)"),
    (["upcycle", RUN, "--out", "o", "--noise=-0.1"], "noise=-0.1", "must be >= 0"),
    (["experiment", "balance", "--seeds", "0"], "argument --seeds: ", "integer >= 1"),
    (["generate", RUN, "--offload.budget=1..5GB"], "expert budget", "bytes (200MB)"),
    (["generate", RUN, "--offload.budget=-3"], "expert budget", "a count (12)"),
    (["generate", RUN, "--offload.budget="], "expert budget", "a count (12)"),
    (["generate", RUN, "--offload.budget=150%"], "expert budget", "(0, 1]"),
    (["generate", RUN, "--offload.budget=1e9"], "expert budget", "a count is a whole number: 12"),
    (["cache-sim", "t", "--budget=200MB"], "expert budget", "does not know the experts"),
    (["cache-sim", "t", "--budget=lots"], "expert budget", "or a fraction (0.5 or 50%)"),
    (["cache-sim", "t", "--policy=fifo"], "--policy='fifo'", "'lru', 'lfu', 'static'"),
    (["quantize", RUN, "--out="], "--out is empty", "give a path"),
    (["convert", "--to-hf", RUN, "--arch", "mixtral", "--out", f"{RUN}/sub"], "is inside the run "
     "being converted", f"{RUN}/sub"),
    (["convert", "--to-hf", RUN, "--arch", "mixtral", "--out", "."], "holds the run being "
     "converted", "choose a folder outside it"),
    (["trace", RUN, "--prompts", "p", "--out", "o/"], "--out o/ is a directory", "o/"),
]  # fmt: skip


@pytest.mark.parametrize("argv, names, says", BAD, ids=[" ".join(a[0:1] + a[-2:]) for a, *_ in BAD])
def test_bad_argument_is_one_line_naming_it_and_what_it_must_be(
    capsys, argv: list[str], names: str, says: str
) -> None:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own flags
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"moekit {argv[0]}: error: "), err
    assert names in last and says in last and argv[-1].split("=")[-1] in last, err
    assert "Traceback" not in err


MISSPELT = [
    (["generate", RUN, "--max-new-tokens", "5"], "unknown option '--max-new-tokens': did you mean "
     "--max_new_tokens=VALUE?"),
    (["generate", RUN, "--max-new-tokens=5"], "no field 'max-new-tokens'; its fields are "
     "prompt, chat, system, max_new_tokens"),
    (["analyze", RUN, "--tokens", "256"], "'--tokens' has no value: write --tokens=VALUE"),
    (["trace", RUN, "--prompts", "p", "--out", "o", "--max-new-tokens", "4"], "unknown option "
     "'--max-new-tokens': did you mean --max_new_tokens=VALUE?"),
    (["generate", RUN, "--offload=5"], "--offload='5': expected a JSON object of OffloadConfig's "
     "fields, or set one at a time: --offload.FIELD=VALUE"),
    (["train", "tiny", "--train=3"], "--train='3': expected a JSON object of TrainConfig's fields"),
    (["quantize", RUN, "--weights=int8", "--zero_point=true", "--out", "o"], "zero_point=True is "
     "invalid: applies to int4 weights only"),
    (["train", "--hlep"], "unknown option '--hlep': did you mean --help?"),
    (["train", "tiny", "small"], "unexpected argument 'small': a setting is one argument, "
     "--key=value"),
    (["generate", RUN, "-p", "x"], "unknown option '-p'"),
    (["params", "tiny", "--foo"], "unknown option '--foo'"),
    (["generate", RUN, "--temperature", "0.5"], "setting '--temperature' has no value: write "
     "--temperature=VALUE"),
    (["generate", RUN, "--prompt=x", "extra"], "unexpected argument 'extra'"),
    (["convert", "--to-hf", RUN, "--arch", "mixtral", "--out", "o", "--ovewrite"], "unknown option "
     "'--ovewrite': did you mean --overwrite"),
    (["trace", RUN, "--prompts", "p", "--out", "o", "--max-new-tokens=4"], "no field "
     "'max-new-tokens'; its fields are max_new_tokens"),
    (["cache-sim", "t", "--budget", "50%"], "'--budget' has no value: write --budget=VALUE"),
    (["convert", "--to-hf", RUN, "--arch", "mixtral", "--out", "o", "--layout", "fused"],
     "'--layout' has no value: write --layout=VALUE"),
    (["convert", "--to-hf", RUN, "--arch", "mixtral", "--out", "o", "--max-shard-size=1GB"],
     "no field 'max-shard-size'; its fields are dtype, layout, max_shard_size"),
    (["upcycle", RUN, "--out", "o", "--experts=4"], "no field 'experts'; its fields are n_experts, "
     "top_k, noise"),
]  # fmt: skip


@pytest.mark.parametrize("argv, says", MISSPELT)
def test_misspelt_setting_is_one_line_naming_it(capsys, argv: list[str], says: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moekit {argv[0]}: error: ") and says in err and err.count("\n") == 1


def test_an_empty_list_of_policies_is_one_line(capsys) -> None:
    assert main(["cache-sim", "t", "--policy=none"]) == 2
    err = capsys.readouterr().err
    assert err == "moekit cache-sim: error: policy=() is invalid: must list at least one policy\n"
    assert main(["cache-sim", "t", "--policy=lru,lfu,lru"]) == 2  # its column printed twice
    assert "policy='lru,lfu,lru' is invalid: lists lru twice" in capsys.readouterr().err


def test_numbers_in_range_parse() -> None:
    overrides = ["--temperature=0", "--top_k=0", "--top_p=1", "--seed=0", "--max_new_tokens=1"]
    cfg = resolve_config(GenerateConfig, None, overrides)
    assert cfg.temperature == 0.0 and cfg.top_k == 0 and cfg.top_p == 1.0 and cfg.seed == 0
    assert (
        cfg.max_new_tokens == 1
        and resolve_config(GenerateConfig, None, ["--top_k=none"]).top_k is None
    )
    assert shard_bytes(resolve_config(ConvertConfig, None, [])) == 2 * 10**9
    assert shard_bytes(resolve_config(ConvertConfig, None, ["--max_shard_size=2GiB"])) == 2 * 2**30
    assert resolve_config(UpcycleConfig, None, ["--noise=0"]).noise == 0.0
    cfg = resolve_config(CacheSimConfig, None, ["--budget=4,0.5,25%", "--policy=lru"])
    assert cfg.budget == ("4", "0.5", "25%") and cfg.policy == ("lru",)
    assert build_parser().parse_args(["demo", "--max_new_tokens=1"]).max_new_tokens == 1


def test_a_command_reads_its_config_file_then_the_overrides(tmp_path) -> None:
    path = tmp_path / "generate.json"
    path.write_text(GenerateConfig(prompt="def f(", top_k=None).to_json())
    cfg = resolve_config(GenerateConfig, str(path), ["--offload.budget=50%"])
    assert cfg == GenerateConfig(prompt="def f(", top_k=None, offload=OffloadConfig(budget="50%"))
    with pytest.raises(FileNotFoundError, match=r"config file analyze\.json does not exist"):
        resolve_config(AnalyzeConfig, "analyze.json", [])
    path.write_text('{"tokens": 0}')
    with pytest.raises(
        ValueError, match=r"generate\.json: tokens=0 is invalid: must be an integer"
    ):
        resolve_config(AnalyzeConfig, str(path), [])


@pytest.mark.parametrize("value", ['{"n_experts": 4}', "5"])
def test_nested_config_override_of_the_wrong_shape_is_one_line(capsys, value: str) -> None:
    """A config object missing required fields (or not an object) was a TypeError traceback."""
    assert main(["params", "tiny", f"--model.moe={value}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("moekit params: error: --model.moe=")


def test_a_config_file_that_is_a_directory_is_named_as_one(tmp_path, capsys) -> None:
    """It was "config file DIR does not exist"."""
    assert main(["generate", RUN, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"moekit generate: error: config file {tmp_path} is a directory; give a JSON file\n"
    )


def test_a_config_file_that_is_not_json_says_what_it_should_be(tmp_path, capsys) -> None:
    path = tmp_path / "run.json"
    path.write_text("{")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "a config file is one JSON object, a RunConfig or a ModelConfig" in err, err


@pytest.mark.parametrize(
    "value, says",
    [
        ('{"d_model": 48, "d_expert": 40, "n_experts": 4, "top_k": 8}',
         "top_k=8 is invalid: must be <= n_experts (4)"),
        ('{"n_experts": 4}', "MoEConfig needs the field(s) ['d_model', 'd_expert']"),
        ("{bad", "expected JSON (expecting property name"),
    ],
)  # fmt: skip
def test_a_nested_config_override_says_what_is_wrong_with_it(capsys, value: str, says) -> None:
    """A JSON object for an optional config was "expected MoEConfig or none", its fault unsaid."""
    assert main(["params", "tiny", f"--model.moe={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moekit params: error: --model.moe={value!r}: "), err  # as given
    assert says in err and err.count("--model.moe=") == 1 and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "argv",
    [
        ["analyze", RUN, "--out", "{out}"],
        ["experiment", "balance", "--preset", "tiny", "--out", "{out}"],
    ],
    ids=["analyze", "experiment"],
)
def test_a_report_folder_of_something_else_is_refused(tmp_path, capsys, argv) -> None:
    """analyze and experiment wrote their report.md into any --out, a training run's included."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.md").write_text("the run's own report")
    assert main([a.format(out=out) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds other files than" in err and "choose another --out" in err
    assert (out / "report.md").read_text() == "the run's own report"


def test_an_argument_that_is_not_utf8_is_one_line(capsys) -> None:
    """Bytes from the shell (Python keeps them as surrogates): tokenizers raised a TypeError."""
    assert main(["generate", RUN, "--prompt=\udcff"]) == 2
    err = capsys.readouterr().err
    said = "argument '--prompt=\\xff' is not UTF-8 text; give text in UTF-8"
    assert err == f"moekit generate: error: {said}\n"


def test_an_allocation_that_fails_is_one_line_and_other_runtime_errors_still_raise(
    capsys, monkeypatch
) -> None:
    """torch's CPU allocator raises a RuntimeError ("can't allocate memory"), which had been a
    traceback; a RuntimeError of anything else is a bug, and stays a traceback."""
    import dataclasses

    import torch

    from moekit.cli import COMMANDS
    from moekit.train import TrainingDiverged

    def allocate(args) -> None:
        torch.empty(2**50)  # 4 PB of float32: refused at once, nothing touched

    params = COMMANDS["params"]
    monkeypatch.setitem(COMMANDS, "params", dataclasses.replace(params, run=allocate))
    assert main(["params", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit params: error: out of memory (4,503,599.6 GB asked): ")
    assert err.count("\n") == 1

    def diverged(args) -> None:  # a RuntimeError too: its one line, exit 1, comes first
        raise TrainingDiverged("train loss is nan at step 3")

    monkeypatch.setitem(COMMANDS, "params", dataclasses.replace(params, run=diverged))
    assert main(["params", "tiny"]) == 1
    assert capsys.readouterr().err == "\nerror: train loss is nan at step 3\n"

    def bug(args) -> None:
        raise RuntimeError("a shape mismatch")

    monkeypatch.setitem(COMMANDS, "params", dataclasses.replace(params, run=bug))
    with pytest.raises(RuntimeError, match="a shape mismatch"):
        main(["params", "tiny"])


def test_a_config_file_after_the_settings_is_still_the_config_file(tmp_path, capsys) -> None:
    """argparse ends the positionals at the first setting, so `cache-sim TRACE --policy=lru
    FILE.json` called the file an unexpected argument; it is read as the config, then the
    settings applied over it (its empty budget list is its own error, before the trace is read)."""
    path = tmp_path / "sim.json"
    path.write_text('{"budget": []}')
    assert main(["cache-sim", str(tmp_path / "missing.trace"), "--policy=lru", str(path)]) == 2
    err = capsys.readouterr().err
    assert "budget" in err and "must list at least one budget" in err, err
    path.write_text('{"budget": ["50%"]}')
    assert main(["cache-sim", str(tmp_path / "missing.trace"), "--policy=lru", str(path)]) == 2
    assert "missing.trace does not exist" in capsys.readouterr().err
    assert main(["generate", "no-run", "--prompt", "about.json"]) == 2  # an option's value
    assert "'--prompt' has no value" in capsys.readouterr().err


def test_none_is_the_scheme_none_where_a_field_can_name_it() -> None:
    """quantize's --experts=none had been read as None ("use --weights"), so the experts were
    quantized; null still leaves a part to --weights, and none elsewhere is None."""
    cfg = resolve_config(QuantizeConfig, None, ["--weights=int8", "--experts=none"])
    assert cfg.experts == "none" and cfg.scheme_of("experts") is None
    assert resolve_config(QuantizeConfig, None, ["--experts=null"]).experts is None
    assert resolve_config(GenerateConfig, None, ["--top_k=none"]).top_k is None


def test_a_setting_after_one_inside_it_is_one_line(capsys) -> None:
    """--model.moe.top_k=1 --model.moe=null dropped top_k, unseen; the same key twice is the last
    one's, as with options (a script's defaults, then the user's)."""
    assert main(["params", "tiny", "--model.moe.top_k=1", "--model.moe=null"]) == 2
    err = capsys.readouterr().err
    assert "--model.moe is given after --model.moe.top_k, which it would drop" in err
    assert err.count("\n") == 1, err
    assert main(["params", "tiny", "--model.moe.top_k=1", "--model.moe.top_k=2"]) == 0


def test_a_config_file_with_a_key_twice_is_named(tmp_path, capsys) -> None:
    path = tmp_path / "generate.json"
    path.write_text('{"prompt": "x", "max_new_tokens": 3, "prompt": "y"}')
    assert main(["generate", RUN, str(path)]) == 2
    assert "gives the key 'prompt' twice (JSON keeps the last)" in capsys.readouterr().err
    run = tmp_path / "run.json"
    run.write_text('{"model": {}, "model": {}}')
    assert main(["train", str(run)]) == 2
    assert "gives the key 'model' twice" in capsys.readouterr().err
    moe = ModelConfig.preset("small").moe
    assert moe is not None
    whole = f"--model.moe={json.dumps(moe.to_dict())}"  # whole, then one inside it: allowed
    check_nothing_lost([whole, "--model.moe.top_k=1"])  # (the check `main` runs: no error)
    assert resolve_config(RunConfig, None, [whole, "--model.moe.top_k=1"]).model.moe.top_k == 1


def test_an_output_that_is_a_link_to_nothing_is_refused(tmp_path, capsys) -> None:
    """quantize gave a raw "[Errno 20] Not a directory" on its temporary, trace replaced the link
    with a file, train failed after preparing its data. Each refuses it before reading anything
    (the run does not even exist here)."""
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    for argv in (["quantize", "no-run", f"--out={link}"],
                 ["trace", "no-run", "--prompts", "p.txt", f"--out={link}"],
                 ["train", "tiny", f"--out={link}", "--train.data.source=no-corpus"]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{link} is a link to {tmp_path / 'gone'}, which does not exist; remove" in err, err
    assert link.is_symlink() and not (tmp_path / "gone").exists()
