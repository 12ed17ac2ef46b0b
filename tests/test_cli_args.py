"""Every numeric argument of the command line is checked by argparse: a value out of range is one
line naming the flag and what it must be, exit 2, before anything is loaded."""

from __future__ import annotations

import pytest

from moekit.cli import build_parser, main

RUN = "no-such-run"  # never read: argparse fails first

BAD = [
    (["generate", RUN, "--max-new-tokens", "-3"], "--max-new-tokens", "integer >= 1"),
    (["generate", RUN, "--max-new-tokens", "0"], "--max-new-tokens", "integer >= 1"),
    (["generate", RUN, "--max-new-tokens", "ten"], "--max-new-tokens", "integer >= 1"),
    (["generate", RUN, "--temperature", "-0.5"], "--temperature", "number >= 0"),
    (["generate", RUN, "--temperature", "nan"], "--temperature", "finite"),
    (["generate", RUN, "--temperature", "inf"], "--temperature", "finite"),
    (["generate", RUN, "--top-k", "-1"], "--top-k", "0 for no top-k"),
    (["generate", RUN, "--top-p", "0"], "--top-p", "(0, 1]"),
    (["generate", RUN, "--top-p", "1.5"], "--top-p", "(0, 1]"),
    (["generate", RUN, "--seed", "-1"], "--seed", "[0, 2**64)"),
    (["generate", RUN, "--seed", str(2**64)], "--seed", "[0, 2**64)"),
    (["trace", RUN, "--prompts", "p", "--out", "o", "--max-new-tokens", "0"], "--max-new-tokens",
     "integer >= 1"),
    (["params", "tiny", "--ep", "0"], "--ep", "integer >= 1"),
    (["convert", "--to-hf", RUN, "--arch", "mixtral", "--out", "o", "--max-shard-size", "0"],
     "--max-shard-size", "size above 0"),
    (["convert", "--to-hf", RUN, "--arch", "mixtral", "--out", "o", "--max-shard-size", "lots"],
     "--max-shard-size", "size above 0"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens", "integer >= 1"),
    (["analyze", RUN, "--tokens", "0"], "--tokens", "integer >= 1"),
    (["analyze", RUN, "--seq-len", "-1"], "--seq-len", "integer >= 1"),
    (["upcycle", RUN, "--out", "o", "--experts", "0"], "--experts", "integer >= 1"),
    (["upcycle", RUN, "--out", "o", "--top-k", "0"], "--top-k", "integer >= 1"),
    (["upcycle", RUN, "--out", "o", "--noise", "-0.1"], "--noise", "number >= 0"),
    (["experiment", "balance", "--seeds", "0"], "--seeds", "integer >= 1"),
    (["layer-demo", "--tokens", "0"], "--tokens", "integer >= 1"),
    (["layer-demo", "--experts", "-2"], "--experts", "integer >= 1"),
    (["layer-demo", "--top-k", "0"], "--top-k", "integer >= 1"),
    (["layer-demo", "--capacity-factor", "0"], "--capacity-factor", "number > 0"),
    (["generate", RUN, "--expert-budget", "1..5GB"], "--expert-budget", "bytes (200MB)"),
    (["generate", RUN, "--expert-budget", "-3"], "--expert-budget", "a count (12)"),
    (["generate", RUN, "--expert-budget", ""], "--expert-budget", "a count (12)"),
    (["generate", RUN, "--expert-budget", "150%"], "--expert-budget", "(0, 1]"),
    (["cache-sim", "t", "--budget", "50%", "200MB"], "--budget", "does not know the experts"),
    (["cache-sim", "t", "--budget", "lots"], "--budget", "or a fraction (0.5 or 50%)"),
]  # fmt: skip


@pytest.mark.parametrize("argv, flag, says", BAD, ids=[" ".join(a[0:1] + a[-2:]) for a, *_ in BAD])
def test_out_of_range_number_is_an_argparse_error_naming_the_flag(
    capsys, argv: list[str], flag: str, says: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"moekit {argv[0]}: error: argument {flag}: "), err
    assert says in last and argv[-1] in last and "Traceback" not in err


def test_numbers_in_range_parse() -> None:
    args = build_parser().parse_args(
        ["generate", RUN, "--temperature", "0", "--top-k", "0", "--top-p", "1", "--seed", "0"]
    )
    assert args.temperature == 0.0 and args.top_k is None and args.top_p == 1.0
    args = build_parser().parse_args(["generate", RUN, "--top-k", "5", "--max-new-tokens", "1"])
    assert args.top_k == 5 and args.max_new_tokens == 1
    args = build_parser().parse_args(["convert", "--to-hf", RUN, "--out", "o"])
    assert args.max_shard_size == 2 * 10**9
    args = build_parser().parse_args(["upcycle", RUN, "--out", "o", "--noise", "0"])
    assert args.noise == 0.0


@pytest.mark.parametrize("value", ['{"n_experts": 4}', "5"])
def test_nested_config_override_of_the_wrong_shape_is_one_line(capsys, value: str) -> None:
    """A config object missing required fields (or not an object) was a TypeError traceback."""
    assert main(["params", "tiny", f"--model.moe={value}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("moekit params: error: --moe=")
