"""The throughput parts of `dreamlm bench speed` on tiny shapes: what they measure and report, not how fast."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from dreamlm.bench import speed_table, write_speed_report
from dreamlm.cli import app
from dreamlm.throughput import SMOLLM2_135M, Shape, decode_throughput, loss_curves, train_throughput

TINY = Shape("tiny", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1)


def test_smollm2_shape_has_its_published_size():
    config = SMOLLM2_135M.config(context=256)
    assert (config.hidden_size, config.num_hidden_layers, config.dim_per_head) == (576, 30, 64)
    assert config.tie_word_embeddings and not config.attention_bias
    with torch.device("meta"):
        from dreamlm.model import DreamModel

        assert DreamModel(config).num_parameters() == 134_515_008  # SmolLM2-135M's count


def test_training_compares_fp32_with_bf16_autocast():
    report = train_throughput(TINY, batch=2, seq=16, steps=1, warmup=0)
    assert [r["precision"] for r in report["rows"]] == ["fp32", "bf16"]
    fp32, bf16 = (r["tokens_per_second"] for r in report["rows"])
    assert fp32 > 0 and bf16 > 0 and math.isclose(report["bf16_vs_fp32"], bf16 / fp32)
    embedding_and_head = 2 * 64 * 32
    attention = 32 * 32 + 32 + 2 * (32 * 16 + 16) + 32 * 32  # q (with bias), k and v (1 KV head of 16), o
    mlp, norms = 3 * 32 * 64, 3 * 32
    assert report["parameters"] == embedding_and_head + attention + mlp + norms


def test_loss_curves_share_seed_and_data():
    curves = loss_curves(steps=3, batch=2, seq=16)
    assert len(curves["fp32"]) == len(curves["bf16"]) == 3
    assert all(math.isfinite(v) for v in curves["fp32"] + curves["bf16"])
    assert curves["fp32"] != curves["bf16"]  # bf16 really ran: an autocast changes the low bits


def test_decode_runs_every_mode_at_one_dtype():
    report = decode_throughput(TINY, batch=2, prompt=4, new_tokens=16, per_forward=4, block_length=16,
                               dtype=torch.bfloat16, vanilla=True)
    modes = [r["mode"] for r in report["rows"]]
    assert modes[0].startswith("diffusion fast path") and "diffusion vanilla (1/pass)" in modes
    assert modes[-1] == "transformers Qwen2ForCausalLM generate (AR, KV cache)"
    assert (report["canvas"], report["dtype"]) == (20, "bfloat16")
    assert math.isclose(report["fast_vs_transformers"],
                        report["rows"][0]["tokens_per_second"] / report["rows"][-1]["tokens_per_second"])
    with pytest.raises(Exception, match="multiple of block_length"):
        decode_throughput(TINY, new_tokens=30, block_length=16)


def test_speed_report_tables_and_plot(tmp_path):
    report = {"machine": "test machine", "command": "dreamlm bench speed", "task": "sudoku4", "n": 1,
              "dtype": "bfloat16", "rows": [],
              "training": [train_throughput(TINY, batch=2, seq=16, steps=1, warmup=0)],
              "loss_curves": {"model": "tiny", "parameters": 1000, "batch": 2, "seq": 16, "steps": 2,
                              "data": "stdlib:train", "fp32": [5.0, 4.0], "bf16": [5.0, 4.5]},
              "decode": [decode_throughput(TINY, batch=1, prompt=4, new_tokens=16, per_forward=4, block_length=16)]}
    table = speed_table(report)
    assert "| tiny | 0.0 M |" in table and "| bf16 | 5.000 | 4.500 | 0.500 |" in table
    assert "Decoding tiny" in table and "| 1.00× |" in table  # the transformers row against itself
    write_speed_report(report, tmp_path)
    assert json.loads((tmp_path / "speed.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "speed.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--new-tokens", "100"], "--new-tokens must be a multiple of 32"),
    (["--curve-steps", "-1"], "--curve-steps must be >= 0"),
    (["--dtype", "fp8"], "unknown dtype 'fp8'"),
])
def test_bench_speed_refuses_bad_options_in_one_line(tmp_path, args, message):
    res = CliRunner().invoke(app, ["bench", "speed", "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and message in res.stderr
