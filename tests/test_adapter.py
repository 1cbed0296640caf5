"""LoRA adapters and training precision: the adapter starts as its base, merges exactly, round-trips through its
PEFT-layout directory (peft itself reads it the same way), trains only what it should, resumes exactly; bf16 autocast
training stays close to fp32 and `auto` picks the precision the hardware has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dreamlm import precision
from dreamlm.adapter import LoraSpec, add_lora, extract_adapter, lora_layers, merge_lora, save_adapter
from dreamlm.errors import DreamError
from dreamlm.model import DreamModel
from dreamlm.training.config import TrainConfig
from dreamlm.training.trainer import Trainer, train

from test_training import TEXT, corpus, losses, pretrain_cfg  # noqa: F401  (corpus is a fixture)


def _ids(model: DreamModel, n: int = 24, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, n), generator=gen)


def _randomise_b(model: DreamModel, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)


def test_lora_starts_as_the_base_and_merges_exactly(tiny_dir):
    base = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    wrapped = add_lora(model, LoraSpec(rank=4, alpha=8.0))
    assert len(wrapped) == 7 * model.config.num_hidden_layers
    x = _ids(model)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))  # B = 0: exactly the base
        _randomise_b(model)
        adapted = model(x)
        assert not torch.allclose(adapted, base(x))
        merged = merge_lora(model)(x)
    assert not lora_layers(model)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_only_adapter_parameters_train():
    from dreamlm.tiny import tiny_config, tiny_tokenizer

    model = DreamModel(tiny_config(tiny_tokenizer())).init_weights(0)
    mask = model.config.mask_token_id
    add_lora(model, LoraSpec(rank=2, alpha=4.0, train_rows=[mask]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.endswith("norm.weight") or n == "model.embed_tokens.weight" for n in trainable)
    assert not any(n.endswith("base.weight") for n in trainable)
    before = model.model.embed_tokens.weight.detach().clone()
    x = _ids(model)
    x[:, ::3] = mask
    model(x).float().pow(2).mean().backward()
    grad = model.model.embed_tokens.weight.grad
    rows = grad.abs().sum(1).nonzero().flatten().tolist()
    assert rows == [mask]  # every other row of the (tied) embedding gets no gradient
    assert torch.equal(model.model.embed_tokens.weight, before)


def _saved_adapter(tiny_dir: Path, out: Path) -> tuple[DreamModel, LoraSpec, Path]:
    """A rank-4 adapter over the tiny model with every kind of tensor changed (pairs, a norm, the mask row), saved."""
    model = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    spec = LoraSpec(rank=4, alpha=8.0, train_rows=[model.config.mask_token_id])
    add_lora(model, spec)
    _randomise_b(model)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
        model.model.embed_tokens.weight[model.config.mask_token_id] += 0.25
    return model, spec, save_adapter(model, spec, out, base=str(tiny_dir), dtype=torch.float32)


def test_adapter_directory_round_trip_and_errors(tiny_dir, tmp_path):
    model, spec, out = _saved_adapter(tiny_dir, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == str(tiny_dir)
    x = _ids(model)
    with torch.no_grad():
        expected = merge_lora(model)(x)
        loaded = DreamModel.from_pretrained(out, dtype=torch.float32).eval()  # a normal model directory
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    assert loaded.tokenizer is not None
    # an adapter of another shape is one clear error, not a silent partial merge
    other = tmp_path / "other"
    spec8 = LoraSpec(rank=2, alpha=2.0)
    from dreamlm.tiny import tiny_config, tiny_tokenizer

    wide = DreamModel(tiny_config(tiny_tokenizer(), hidden_size=48, heads=2, kv_heads=1)).init_weights(0)
    add_lora(wide, spec8)
    save_adapter(wide, spec8, other, base=str(tiny_dir))
    with pytest.raises(DreamError, match="shape|does not fit"):
        DreamModel.from_pretrained(other)
    (other / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0, "lora_alpha": 1, '
                                               '"base_model_name_or_path": "x"}')
    with pytest.raises(DreamError, match="r must be >= 1"):
        DreamModel.from_pretrained(other)


def test_peft_reads_our_adapter_the_same_way(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    spec = LoraSpec(rank=4, alpha=8.0, train_norms=False)
    add_lora(model, spec)
    _randomise_b(model)
    out = save_adapter(model, spec, tmp_path / "adapter", base=str(tiny_dir), dtype=torch.float32)
    x = _ids(model)
    with torch.no_grad():
        ours = model(x)
    plain = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=spec.targets, lora_dropout=0.0)
    injected = peft.inject_adapter_in_model(config, plain)
    from safetensors.torch import load_file

    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
    state = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
             for k, v in state.items()}
    missing = injected.load_state_dict(state, strict=False)
    assert not missing.unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(injected(x), ours, rtol=1e-5, atol=1e-5)


def _lora_cfg(corpus: Path, tiny_dir: Path, out: Path, *extra: str) -> TrainConfig:
    return pretrain_cfg(corpus, out, f"model.init_from={tiny_dir}", "adapter.kind=lora", "adapter.rank=4",
                        "adapter.alpha=8", "optim.lr=1e-2", "optim.weight_decay=0.1", *extra)


def test_lora_run_trains_the_adapter_only_resumes_exactly_and_exports_it(tmp_path, corpus, tiny_dir):
    straight = train(_lora_cfg(corpus, tiny_dir, tmp_path / "a"))
    assert (straight / "adapter_config.json").is_file() and not (straight / "model.safetensors").exists()
    assert train(_lora_cfg(corpus, tiny_dir, tmp_path / "b", "run.stop_at=5")) is None
    train(_lora_cfg(corpus, tiny_dir, tmp_path / "b"), resume=True)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    base = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32)
    adapted = DreamModel.from_pretrained(straight, dtype=torch.float32)
    b, a = dict(base.named_parameters()), dict(adapted.named_parameters())
    mask = base.config.mask_token_id
    changed_rows = (a["model.embed_tokens.weight"] != b["model.embed_tokens.weight"]).any(1).nonzero().flatten()
    assert changed_rows.tolist() == [mask]
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])
    # the weight decay of the run reaches the low-rank pairs only: the frozen q/k/v biases never move
    assert torch.equal(a["model.layers.0.self_attn.q_proj.bias"], b["model.layers.0.self_attn.q_proj.bias"])


def test_lora_config_errors():
    with pytest.raises(DreamError, match="set model.init_from"):
        TrainConfig.load(None, ["data.train=x.txt", "adapter.kind=lora"])
    with pytest.raises(DreamError, match="adapter.rank"):
        TrainConfig.load(None, ["data.train=x.txt", "model.init_from=m", "adapter.kind=lora", "adapter.rank=0"])
    with pytest.raises(DreamError, match="run.precision"):
        TrainConfig.load(None, ["data.train=x.txt", "run.precision=fp8"])


@pytest.mark.parametrize("features,expected", [([], torch.float32), (["avx512_bf16"], torch.bfloat16),
                                               (["avx512_bf16", "amx_bf16"], torch.bfloat16)])
def test_auto_precision_follows_the_cpu(monkeypatch, features, expected):
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: features)
    chosen = precision.training_precision("auto", "cpu")
    assert chosen.dtype == expected
    assert ("no native bf16" in chosen.describe()) == (not features)
    assert precision.training_precision("fp32", "cpu").dtype == torch.float32
    assert precision.training_precision("bf16", "cpu").dtype == torch.bfloat16
    with pytest.raises(DreamError, match="unknown precision"):
        precision.training_precision("half", "cpu")


def test_bf16_training_is_close_to_fp32_and_keeps_fp32_master_weights(tmp_path, corpus, capsys):
    fp32 = Trainer(pretrain_cfg(corpus, tmp_path / "fp32", "run.precision=fp32"))
    bf16 = Trainer(pretrain_cfg(corpus, tmp_path / "bf16", "run.precision=bf16"))
    assert "precision: bf16 (asked for)" in capsys.readouterr().err
    a, b = fp32.train_step(), bf16.train_step()
    # same weights, same batch and masks: only the matmuls' rounding differs. bf16 keeps 8 significant bits
    # (unit roundoff u = 2^-8); a loss of a few nats through a 2-layer model accumulates a relative error of a few u,
    # so 4u = 1.6 % bounds it without being tuned to this run
    assert b["loss"] == pytest.approx(a["loss"], rel=4 * 2 ** -8)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # master weights stay fp32
    assert all(v.dtype == torch.float32 for s in bf16.optimizer.state.values() for v in s.values()
               if torch.is_tensor(v) and v.is_floating_point())


def test_bf16_resume_is_exact_within_the_precision(tmp_path, corpus):
    train(pretrain_cfg(corpus, tmp_path / "a", "run.precision=bf16"))
    assert train(pretrain_cfg(corpus, tmp_path / "b", "run.precision=bf16", "run.stop_at=5")) is None
    train(pretrain_cfg(corpus, tmp_path / "b", "run.precision=bf16"), resume=True)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_time_budget_lowers_max_steps_and_resume_keeps_it(tmp_path, corpus):
    cfg = pretrain_cfg(corpus, tmp_path / "t", "optim.max_steps=100000", "run.time_budget_s=2",
                       "run.save_every=1000", "run.eval_every=1000")
    trainer = Trainer(cfg)
    trainer.fit()
    assert 13 <= trainer.step == trainer.cfg.optim.max_steps < 100000
    state = torch.load(next((tmp_path / "t" / "checkpoints").glob("step-*/trainer_state.pt")), weights_only=True)
    assert state["max_steps"] == trainer.step


def test_extract_adapter_recovers_a_low_rank_fine_tune_exactly(tiny_dir, tmp_path):
    base = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tuned = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a fine-tune whose every update has rank 2: rank 2 must recover it (up to fp32 rounding)
        for name, p in tuned.named_parameters():
            if name.endswith("proj.weight"):
                p += torch.randn(p.shape[0], 2, generator=gen) @ torch.randn(2, p.shape[1], generator=gen) * 0.02
        tuned.model.norm.weight.mul_(1.1)
    spec = LoraSpec(rank=2, alpha=4.0)
    extracted = extract_adapter(base, tuned, spec)
    out = save_adapter(extracted, spec, tmp_path / "delta", base=str(tiny_dir), dtype=torch.float32)
    x = _ids(tuned)
    with torch.no_grad():
        torch.testing.assert_close(DreamModel.from_pretrained(out, dtype=torch.float32).eval()(x), tuned(x),
                                   rtol=1e-4, atol=1e-4)
        rank1 = extract_adapter(DreamModel.from_pretrained(tiny_dir, dtype=torch.float32).eval(), tuned,
                                LoraSpec(rank=1, alpha=1.0))
        assert (rank1(x) - tuned(x)).abs().max() > 1e-3  # rank 1 cannot: the test can fail


def test_training_can_start_from_an_adapter(tiny_dir, tmp_path):
    from dreamlm.adapter import load_adapter_weights

    model, _, out = _saved_adapter(tiny_dir, tmp_path / "adapter")
    again = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    add_lora(again, LoraSpec(rank=4, alpha=16.0, train_rows=[model.config.mask_token_id]), seed=5)  # another scale
    load_adapter_weights(again, out)
    x = _ids(model)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(DreamError, match="rank 4 differs"):
        other = DreamModel.from_pretrained(tiny_dir, dtype=torch.float32)
        add_lora(other, LoraSpec(rank=2, alpha=2.0))
        load_adapter_weights(other, out)
