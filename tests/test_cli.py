"""The command line: `--a.b=value` overrides, `moekit params`, `train`, `generate`, `analyze`,
`trace`, `cache-sim` and `convert`, each saving its resolved config where it writes; the docs'
`moekit` commands parse."""

from __future__ import annotations

import json
import re
import shlex
import typing
from pathlib import Path

import pytest
from tests.run_cases import JSON_PACKAGE

from moekit.cli import COMMANDS, NUL, OVERRIDE, build_parser, main
from moekit.cli.common import Streamed, flat_overrides, resolve_config
from moekit.config import (
    MODEL_PRESETS,
    RUN_PRESETS,
    AnalyzeConfig,
    CacheSimConfig,
    ConvertConfig,
    GenerateConfig,
    ModelConfig,
    RunConfig,
    TraceConfig,
)
from moekit.inference.cache import POLICIES
from moekit.inference.trace import load_trace
from moekit.interop.files import WEIGHT_DTYPES
from moekit.interop.keymaps import LAYOUTS
from moekit.model import MoETransformer
from moekit.overrides import apply_overrides, split_override


def test_overrides_are_typed_by_their_fields() -> None:
    cfg = apply_overrides(
        RunConfig.preset("small"),
        [
            "--train.lr=3e-4",
            "--model.moe.top_k=1",
            "--train.bf16=true",
            "--train.betas=0.8,0.99",
            "--model.sliding_window=none",
            "--model.qk_norm=head",
            "--train.data.max_files=7",
        ],
    )
    assert cfg.train.lr == 3e-4 and cfg.model.moe is not None and cfg.model.moe.top_k == 1
    assert cfg.train.bf16 is True and cfg.train.betas == (0.8, 0.99)
    assert cfg.model.sliding_window is None and cfg.model.qk_norm == "head"
    assert cfg.train.data.max_files == 7


def test_union_fields_take_each_of_their_forms() -> None:
    base = RunConfig.preset("small")
    forms = {"all": "all", "2": 2, "0,2": (0, 2), "[1, 3]": (1, 3)}
    for text, expected in forms.items():
        cfg = apply_overrides(base, [f"--model.moe_layers={text}", "--model.d_ff=64"])
        assert cfg.model.moe_layers == expected


def test_unknown_key_error_names_the_key_and_the_fields() -> None:
    with pytest.raises(ValueError, match=r"--train\.lrr.*has no field 'lrr'.*\blr\b"):
        apply_overrides(RunConfig.preset("small"), ["--train.lrr=1"])


def test_bad_value_error_names_the_key_and_the_type() -> None:
    with pytest.raises(ValueError, match=r"--model\.moe\.top_k='two': expected int"):
        apply_overrides(RunConfig.preset("small"), ["--model.moe.top_k=two"])


def test_malformed_override_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"'--train\.lr' has no value: write --train\.lr=VALUE"):
        split_override("--train.lr")
    for item in ("--=3", "--train..lr=3"):
        with pytest.raises(ValueError, match="malformed"):
            split_override(item)


def test_params_prints_the_parameter_table(capsys) -> None:
    assert main(["params", "tiny"]) == 0
    out = capsys.readouterr().out
    total = MoETransformer(ModelConfig.preset("tiny")).num_parameters()
    assert "routed experts" in out and f"{total:,}" in out.splitlines()[-1]


def test_unknown_preset_is_one_line_error(capsys) -> None:
    assert main(["params", "no-such-model"]) == 2
    assert "known model presets are tiny" in capsys.readouterr().err


def test_commands_on_a_trained_run_print_and_save_their_resolved_configs(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    run = tmp_path / "run"
    args = [
        "train",
        "tiny",
        f"--out={run}",
        "--train.steps=3",
        "--train.progress=false",
        f"--train.data.source={JSON_PACKAGE}",
        "--train.data.tokenizer=bytes",
        f"--train.data.cache_dir={tmp_path / 'cache'}",
    ]
    assert main(args) == 0
    saved = saved_run = RunConfig.from_json((run / "config.json").read_text())
    assert saved.train.steps == 3 and saved.train.data.tokenizer == "bytes"
    printed = capsys.readouterr().out.split("resolved config:\n")[1]
    assert RunConfig.from_json(printed[: printed.index("\n}\n") + 2]) == saved
    assert main(["generate", str(run), "--prompt=def f(", "--max_new_tokens=5"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def f(")  # the text alone: its resolved config goes to stderr
    printed = GenerateConfig.from_json(out.err.split("resolved config:\n")[1])
    assert printed == GenerateConfig(prompt="def f(", max_new_tokens=5)
    with monkeypatch.context() as patch:  # text the context cut short: a note says so
        cut = Streamed("x", [1] * 127, cut_by_context=True)
        patch.setattr("moekit.cli.generate.stream_text", lambda *args, **kwargs: cut)
        assert main(["generate", str(run), "--max_new_tokens=500"]) == 0
    note = "note: the text stopped at the model's context (max_seq_len=128), 127 of --max_new_"
    assert note in capsys.readouterr().err
    greedy = ["generate", str(run), "--temperature=0", "--top_k=5", "--max_new_tokens=2"]
    assert main(greedy) == 0  # top_k is not read by greedy decoding: a note says so
    assert "note: --top_k=5 has no effect with --temperature=0" in capsys.readouterr().err
    assert main([*greedy[:3], "--max_new_tokens=2"]) == 0
    assert "no effect" not in capsys.readouterr().err
    analyze = ["analyze", str(run), f"--data={JSON_PACKAGE}", "--tokens=300", "--seq_len=32"]
    assert main(analyze) == 0
    saved = AnalyzeConfig.from_json((run / "analysis/analyze_config.json").read_text())
    assert saved == AnalyzeConfig(data=str(JSON_PACKAGE), tokens=300, seq_len=32)
    assert (run / "analysis/report.md").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(\nimport json\n")
    trace = tmp_path / "run.trace"
    args = ["trace", str(run), "--prompts", str(prompts), "--out", str(trace), "--max_new_tokens=3"]
    assert main(args) == 0
    assert load_trace(trace).ids.shape[1:] == (2, 2)  # tiny: 2 layers, top_k=2
    saved = TraceConfig.from_json(Path(f"{trace}.config.json").read_text())
    assert saved == TraceConfig(max_new_tokens=3)
    config = tmp_path / "cache_sim.json"
    config.write_text(CacheSimConfig(budget=("4",), policy=("lfu",)).to_json())
    capsys.readouterr()
    assert main(["cache-sim", str(trace), str(config), "--budget=50%,3"]) == 0
    out = capsys.readouterr().out
    printed = out.split("resolved config:\n")[1]
    printed = CacheSimConfig.from_json(printed[: printed.index("\n}\n") + 2])
    assert printed == CacheSimConfig(budget=("50%", "3"), policy=("lfu",))
    table = [line.split() for line in out.splitlines()[-4:]]  # 50% of 12 experts, 3, top_k=2
    assert [row[0] for row in table] == ["budget", "6", "3", "2"] and table[0][1:] == [
        "lfu",
        "belady",
    ]
    assert main(["cache-sim", str(trace), "--budget=40,3"]) == 0  # 40 of 12 experts: all 12
    captured = capsys.readouterr()
    assert "note: --budget 40 is more than the trace's 12 experts" in captured.err
    assert [line.split()[0] for line in captured.out.splitlines()[-3:]] == ["12", "3", "2"]
    hf, back = tmp_path / "hf", tmp_path / "back"
    to_hf = ["convert", "--to-hf", str(run), "--arch", "mixtral", "--out", str(hf)]
    assert main([*to_hf, "--layout=fused", "--dtype=bfloat16", "--max_shard_size=100KB"]) == 0
    saved = ConvertConfig.from_json((hf / "convert_config.json").read_text())
    assert saved == ConvertConfig(layout="fused", dtype="bfloat16", max_shard_size="100KB")
    assert len(list(hf.glob("model-*-of-*.safetensors"))) > 1
    assert json.loads((hf / "config.json").read_text())["model_type"] == "mixtral"
    assert main(["convert", "--from-hf", str(hf), "--out", str(back), "--dtype=float32"]) == 0
    saved = ConvertConfig.from_json((back / "convert_config.json").read_text())
    assert saved == ConvertConfig(dtype="float32")
    model = RunConfig.from_json((back / "config.json").read_text()).model
    assert model.moe == saved_run.model.moe and model.n_layers == saved_run.model.n_layers
    # each direction refuses what it would ignore or overwrite, before anything is read
    capsys.readouterr()
    assert main(to_hf) == 2  # hf is written now
    assert "is not empty; pass --overwrite to replace it" in capsys.readouterr().err
    from_hf = ["convert", "--from-hf", str(hf), "--out", str(tmp_path / "back2")]
    assert main([*from_hf, "--arch", "mixtral", "--layout=fused"]) == 2
    err = capsys.readouterr().err
    assert "--layout, --arch apply to --to-hf only" in err and not (tmp_path / "back2").exists()
    back3 = tmp_path / "back3"  # the settings file --to-hf wrote (layout fused) reads back
    assert main(["convert", "--from-hf", str(hf), str(hf / "convert_config.json"), "--out",
                 str(back3)]) == 0  # fmt: skip
    capsys.readouterr()
    (hf / "tokenizer.json").unlink()  # a checkpoint without one: the run has none, said so
    assert main(from_hf) == 0
    assert "has no tokenizer.json" in capsys.readouterr().err
    assert not (tmp_path / "back2" / "tokenizer.json").exists()


def test_command_configs_name_what_their_modules_take() -> None:
    """The configs spell out choices the layers above them hold (config imports none of them)."""
    hints = typing.get_type_hints(CacheSimConfig)
    assert typing.get_args(typing.get_args(hints["policy"])[0]) == POLICIES
    assert CacheSimConfig().policy == POLICIES
    hints = typing.get_type_hints(ConvertConfig)
    assert typing.get_args(typing.get_args(hints["dtype"])[0]) == WEIGHT_DTYPES
    assert typing.get_args(hints["layout"]) == LAYOUTS


def test_the_settings_help_lists_are_overrides_that_give_the_defaults(capsys) -> None:
    """`moekit COMMAND -h` lists each setting as the override that sets its default."""
    configs = [cmd.config() for cmd in COMMANDS.values() if cmd.config is not None]
    assert {type(cfg) for cfg in configs} >= {TraceConfig, CacheSimConfig, ConvertConfig}
    for cfg in configs:
        assert resolve_config(type(cfg), None, flat_overrides(cfg.to_dict())) == cfg
    small = RunConfig.preset("small")  # lists, empty lists and None among its fields
    assert resolve_config(RunConfig, "tiny", flat_overrides(small.to_dict())) == small
    with pytest.raises(SystemExit):
        main(["cache-sim", "-h"])
    printed = " ".join(capsys.readouterr().out.split())  # argparse wraps it at the width
    assert "defaults: --budget=100%,50%,25% --policy=lru,lfu,static" in printed
    # the run commands list a preset's (they printed only "--a.b=value, e.g. --train.lr=3e-4")
    for command, preset in (("train", "small"), ("params", "small"), ("demo", "demo")):
        with pytest.raises(SystemExit):
            main([command, "-h"])
        printed = " ".join(capsys.readouterr().out.split())
        settings = RunConfig.preset(preset).to_dict()
        if command == "params":  # it takes model and parallel settings only
            assert "--train." not in printed
            settings.pop("train")
        listed = " ".join(flat_overrides(settings))
        assert f"the '{preset}' preset's values" in printed and listed in printed, command
    with pytest.raises(SystemExit):  # each experiment sets its own train.steps
        main(["experiment", "-h"])
    printed = " ".join(capsys.readouterr().out.split())
    assert re.search(r"--train\.steps=<each experiment's own, \d+(-\d+)?> --train\.", printed)


DOCS = ("README.md", "benchmarks/README.md")


def doc_commands() -> list[tuple[str, list[str]]]:
    """Every `moekit ...` command of the docs' bash blocks, and every `torchrun ... -m moekit ...`
    one (a line ending in a backslash joined to the next), as moekit's arguments."""
    root = Path(__file__).resolve().parent.parent
    commands = []
    for doc in DOCS:
        in_bash = False
        text = (root / doc).read_text().replace("\\\n", " ")
        for line in text.splitlines():
            if line.startswith("```"):
                in_bash = line == "```bash"
            elif in_bash and line.startswith(("moekit ", "torchrun ")):
                words = shlex.split(line, comments=True)
                assert "moekit" in words, f"{doc}: a torchrun line that runs no moekit: {line}"
                commands.append((doc, words[words.index("moekit") + 1 :]))
    return commands


@pytest.mark.parametrize("doc, argv", doc_commands(), ids=lambda v: " ".join(v)[:60])
def test_the_docs_commands_parse_and_their_settings_exist(doc: str, argv: list[str]) -> None:
    """As `main` reads them: its arguments parse and each `--a.b=value` is a field of the config
    it overrides, with a value that field takes (nothing is read or run)."""
    argv = [a.replace(" ", NUL) if OVERRIDE.match(a) else a for a in argv]
    args, extra = build_parser().parse_known_args(argv)
    extra = [item.replace(NUL, " ") for item in extra]
    cmd = COMMANDS[args.command]
    assert cmd.overrides or not extra, (doc, argv)
    if cmd.config is not None:
        resolve_config(cmd.config, None, extra)
    elif args.command == "train" and args.config in (*MODEL_PRESETS, *RUN_PRESETS):  # its preset
        resolve_config(RunConfig, args.config, extra)
    elif args.command in ("train", "demo"):
        resolve_config(RunConfig, None, extra)
    else:
        for item in extra:
            split_override(item)


def test_a_runs_config_given_as_a_commands_settings_says_so(tmp_path: Path) -> None:
    """`moekit generate RUN RUN/config.json` said "GenerateConfig has no field(s) ['model',
    'parallel', 'train']", naming what is wrong and not what is right."""
    path = tmp_path / "config.json"
    path.write_text(RunConfig.preset("tiny").to_json())
    with pytest.raises(ValueError, match=r"is a run's config \(model, train\), not GenerateConfig"):
        resolve_config(GenerateConfig, str(path), [])
