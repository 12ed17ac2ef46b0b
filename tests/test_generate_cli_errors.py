"""`moekit generate`'s settings that a rule read wrongly: one line naming the rule that holds."""

from __future__ import annotations

import pytest

from moekit.cli import main
from moekit.config import GenerateConfig, UpcycleConfig


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_a_temperature_must_be_finite_and_the_rule_says_so(value: str, tmp_path, capsys) -> None:
    """inf is >= 0: the rule it breaks is finiteness, and the line says so (it said only
    "must be >= 0"). Found before the run is looked at."""
    assert main(["generate", str(tmp_path / "no-run"), f"--temperature={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit generate: error: temperature=") and err.count("\n") == 1
    assert err.endswith(" is invalid: must be >= 0 and finite\n")


def test_upcycle_noise_says_finite_too_and_zero_stays_allowed() -> None:
    with pytest.raises(ValueError, match=r"noise=inf is invalid: must be >= 0 and finite"):
        UpcycleConfig(noise=float("inf"))
    assert GenerateConfig(temperature=0).temperature == 0  # 0 (greedy) stays allowed


def test_draft_tokens_without_speculative_is_refused_before_the_run_is_read(
    tmp_path, capsys
) -> None:
    """--draft_tokens sets speculative decoding's drafts: alone it was ignored. The run folder
    does not exist here, so the refusal comes before anything is read."""
    assert main(["generate", str(tmp_path / "no-run"), "--draft_tokens=4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--draft_tokens=4 is how many tokens --speculative=mtp" in err
    assert main(["generate", str(tmp_path / "no-run"), "--draft_tokens=2"]) == 2  # the default
    assert "is neither a run directory" in capsys.readouterr().err
