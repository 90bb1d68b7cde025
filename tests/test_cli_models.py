"""`mambaout models` and the README's variant table, both generated from the registry."""

from pathlib import Path

import mambaout
from mambaout.cli import main
from mambaout.cli.models import variant_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_models_command_lists_every_variant(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in mambaout.list_models():
        assert f"| {name} |" in out
    assert "| mambaout_femto | 3,3,9,3 | 48,96,192,288 | 7.305 | 1.148 | 78.90 | official, timm |" in out


def test_models_command_filters(capsys):
    assert main(["models", "*rw"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| mambaout")]
    assert len(rows) == 5 and all("_rw |" in r for r in rows)


def test_readme_table_is_the_generated_one():
    text = README.read_text()
    block = text.split("<!-- variants:begin -->\n")[1].split("\n<!-- variants:end -->")[0]
    assert block == variant_table(), "README variant table is stale: paste the output of `mambaout models`"


def test_unknown_command_is_one_line_and_exit_2(capsys):
    assert main(["nope"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_models_with_token_mixers_show_what_each_costs(capsys):
    assert main(["models", "mambaout_femto", "--token-mixer", "conv,conv_ssm,attention"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[2].strip(): line for line in out.splitlines() if line.startswith("| mambaout_femto")}
    assert list(rows) == ["conv", "conv_ssm", "attention"]
    assert "| 7.305 | 1.148 | 1.00 |" in rows["conv"]
    ssm_macs = float(rows["conv_ssm"].split("|")[4])
    assert ssm_macs > 1.148 and "analytic count" in out  # the scan's MACs are in, and the note says how
    assert main(["models", "--token-mixer", "mamba"]) == 2
    assert "unknown token mixer mamba" in capsys.readouterr().err


def test_models_command_lists_every_pretrained_tag(capsys):
    assert main(["models", "*plus*", "--tags"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| mambaout_base_plus_rw.")]
    assert [row.split(" | ")[0][2:] for row in rows] == mambaout.list_models("*plus*", include_tags=True)
    assert "| mambaout_base_plus_rw.sw_e150_in12k | 11821 | 224x224 | 288x288 |" in "\n".join(rows)
    assert "| mambaout_base_plus_rw.sw_e150_r384_in12k_ft_in1k | 1000 | 384x384 | 384x384 | 1.0 | squash |" in rows[1]
