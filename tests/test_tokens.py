"""`mambaout tokens`: the paper's long-sequence analysis (τ = 6·D, token counts, linear vs attention FLOPs)."""

import json

import pytest

from mambaout.ablate.tokens import paper_table, token_row, transformer_flops
from mambaout.cli import main


def test_transformer_block_flops_split_into_linear_and_attention():
    assert transformer_flops(384, 196) == (24 * 384**2 * 196, 4 * 384 * 196**2)
    assert transformer_flops(384, 196, causal=True)[1] == 2 * 384 * 196**2
    linear, attention = transformer_flops(100, 600)  # at L = τ = 6·D the two terms are equal
    assert linear == attention


def test_the_papers_table():
    rows = {(r.task, r.model): r for r in paper_table()}
    assert len(rows) == 3 * (2 + 4)
    vit_s, vit_b = rows["ImageNet", "ViT-S"], rows["ImageNet", "ViT-B"]
    assert (vit_s.D, vit_s.tau, vit_s.L, vit_s.long) == (384, 2304, 196, False)
    assert (vit_b.D, vit_b.tau, vit_b.L) == (768, 4608, 196)
    assert rows["COCO", "ViT-S"].L == 4000 and rows["COCO", "ViT-S"].long
    assert rows["ADE20K", "ViT-S"].L == 4096 and rows["ADE20K", "ViT-S"].long
    assert not rows["COCO", "ViT-B"].long  # 4000 < 4608: close to, not past, τ
    stages = [rows["ImageNet", f"mambaout_tiny stage {i}"] for i in range(1, 5)]
    assert [s.D for s in stages] == [96, 192, 384, 576] and [s.L for s in stages] == [3136, 784, 196, 49]
    assert [s.tau for s in stages] == [6 * s.D for s in stages]


def test_stage_tokens_round_up_like_the_network_and_patches_round_down():
    assert token_row("t", "m", 96, 225, 225, 4, pad=True).L == 57 * 57
    assert token_row("t", "m", 384, 225, 225, 16).L == 14 * 14


def test_cli_prints_the_table_and_json(capsys):
    assert main(["tokens"]) == 0
    text = capsys.readouterr().out
    assert "| ImageNet | ViT-S | 224×224 | 16 | 384 | 2304 | 196 |" in text and "mambaout_tiny stage 4" in text
    assert main(["tokens", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 18
    assert set(rows[0]) == {"task", "model", "D", "tau", "L", "long", "flops_linear", "flops_attention"}
    assert rows[0]["flops_linear"] == 24 * 384**2 * 196 and rows[0]["long"] is False


def test_cli_one_width_or_one_model(capsys):
    assert main(["tokens", "--dim", "384", "--img-size", "800", "1280", "--causal", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["L"] == 4000 and row["flops_attention"] == 2 * 384 * 4000**2
    assert main(["tokens", "--model", "mambaout_femto", "--img-size", "64", "96", "--json"]) == 0
    assert [r["L"] for r in json.loads(capsys.readouterr().out)] == [16 * 24, 8 * 12, 4 * 6, 2 * 3]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dim", "0"], "--dim: must be >= 1, got 0"),
        (["--dim", "384", "--model", "mambaout_tiny"], "--dim and --model: give one"),
        (["--img-size", "224"], "--img-size needs --dim D or --model NAME"),
        (["--dim", "384", "--img-size", "8"], "holds no 16-pixel token"),
        (["--model", "mambaout_huge"], "unknown model 'mambaout_huge'"),
    ],
)
def test_cli_errors_are_one_line(capsys, argv, message):
    assert main(["tokens", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
