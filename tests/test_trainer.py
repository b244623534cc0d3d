"""Trainer: accumulation equivalence, data order, loss normalisation, checkpointing, mixed precision, eval, metrics."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from llmkern.train import GlobalBatchOrder, TrainConfig, Trainer, pad_collate
from llmkern.train.loss import causal_lm_loss_sum, count_targets
from llmkern.train.metrics import read_metrics
from llmkern.train.optim import lr_at
from tests._numerics import assert_close
from tests._train_utils import make_dataset, single_thread, snapshot, tiny_model  # noqa: F401 (single_thread: autouse)


def _train(tmp_path, name, data, model=None, eval_data=None, **overrides):
    model = model or tiny_model()
    cfg = dict(output_dir=str(tmp_path / name), max_steps=3, micro_batch_size=8, lr=1e-2, progress=False)
    cfg.update(overrides)
    trainer = Trainer(model, TrainConfig(**cfg), data, eval_dataset=eval_data)
    return model, trainer.train(), trainer


# ------------------------------------------------------------------------------ data order
def test_global_batch_order_is_split_invariant():
    order = GlobalBatchOrder(num_examples=50, global_batch_size=8, seed=3)
    assert order.steps_per_epoch == 6
    for step in (0, 5, 6, 13):
        batch = order.global_batch(step)
        assert len(batch) == 8 and len(set(batch)) == 8
        for mbs, accum, world in ((8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)):
            parts = [order.micro_batches(step, mbs, accum, rank, world) for rank in range(world)]
            flat = [i for rank_parts in parts for micro in rank_parts for i in micro]
            assert sorted(flat) == sorted(batch), (step, mbs, accum, world)
    # one epoch covers distinct examples; the next epoch is a different permutation; same seed, same order
    epoch0 = [i for s in range(6) for i in order.global_batch(s)]
    assert len(set(epoch0)) == 48
    assert [order.global_batch(s) for s in range(6, 12)] != [order.global_batch(s) for s in range(6)]
    assert GlobalBatchOrder(50, 8, seed=3).global_batch(7) == order.global_batch(7)
    assert GlobalBatchOrder(50, 8, seed=4).global_batch(0) != order.global_batch(0)


def test_global_batch_order_errors():
    with pytest.raises(ValueError, match="at least one global batch"):
        GlobalBatchOrder(num_examples=3, global_batch_size=8, seed=0)
    with pytest.raises(ValueError, match="does not match the global batch size"):
        GlobalBatchOrder(16, 8, 0).micro_batches(0, micro_batch_size=3, grad_accum_steps=2)


def test_pad_collate():
    batch = pad_collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [1], "labels": [1]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [1, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "attention_mask" not in pad_collate([{"input_ids": [1, 2], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="'input_ids' and 'labels'"):
        pad_collate([{"input_ids": [1]}])
    with pytest.raises(ValueError, match="2 input_ids but 1 labels"):
        pad_collate([{"input_ids": [1, 2], "labels": [1]}])


# ------------------------------------------------------------------------------ loss
def test_loss_sum_is_shifted_cross_entropy():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, -100, 4, 5], [6, -100, -100, -100, -100]])
    expected = sum(F.cross_entropy(logits[b, t], labels[b, t + 1], reduction="sum")
                   for b in range(2) for t in range(4) if labels[b, t + 1] != -100)
    assert count_targets(labels) == 3
    assert_close(causal_lm_loss_sum(logits, labels), expected, atol=1e-5, rtol=1e-6)


def test_first_step_loss_is_mean_over_all_targets_of_the_global_batch(tmp_path):
    data = make_dataset(16)
    model = tiny_model()
    order = GlobalBatchOrder(16, 8, seed=0)
    batch = pad_collate([data[i] for i in order.global_batch(0)])
    with torch.no_grad():
        logits, _ = model(batch["input_ids"])
        expected = causal_lm_loss_sum(logits, batch["labels"]).item() / count_targets(batch["labels"])
    _, _, trainer = _train(tmp_path, "run", data, model=model, micro_batch_size=2, grad_accum_steps=4, max_steps=1)
    record = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    assert record["targets"] == count_targets(batch["labels"])
    assert record["loss"] == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------ accumulation
def test_accumulation_matches_one_big_batch(tmp_path):
    """8 examples in one pass vs 4 micro-batches of 2, uneven lengths and target counts.

    SGD with momentum keeps the update linear in the gradient, so the parameters agree to fp32
    rounding (Adam's normalisation would amplify rounding in near-zero gradients)."""
    data = make_dataset(16, seed=1)
    counts = {count_targets(pad_collate([d])["labels"]) for d in data}
    assert len(counts) > 3, "the dataset must have uneven target counts"
    results = {}
    for mbs, accum in ((8, 1), (2, 4)):
        model, out, _ = _train(tmp_path, f"{mbs}x{accum}", data, micro_batch_size=mbs, grad_accum_steps=accum,
                               max_steps=3, optimizer="sgd", momentum=0.9, lr=0.5, weight_decay=0.1,
                               warmup_steps=1)
        results[(mbs, accum)] = (snapshot(model), out["loss"])
    (reference, loss), (params, other_loss) = results[(8, 1)], results[(2, 4)]
    start = snapshot(tiny_model())
    assert all(not torch.equal(reference[n], start[n]) for n in start), "training must change every parameter"
    assert other_loss == pytest.approx(loss, rel=1e-5)
    for name in reference:
        assert_close(params[name], reference[name], atol=1e-6, rtol=1e-5, name=name)


def test_accumulation_is_not_a_mean_of_micro_batch_means(tmp_path):
    """Guard against per-micro-batch normalisation: with uneven target counts it would differ."""
    data = make_dataset(8, seed=1)
    order = GlobalBatchOrder(8, 8, seed=0)
    model = tiny_model()
    micro = [pad_collate([data[i] for i in m]) for m in order.micro_batches(0, 2, 4)]
    with torch.no_grad():
        sums = [causal_lm_loss_sum(model(b["input_ids"])[0], b["labels"]).item() for b in micro]
    counts = [count_targets(b["labels"]) for b in micro]
    mean_of_means = sum(s / c for s, c in zip(sums, counts)) / 4
    _, out, _ = _train(tmp_path, "run", data, model=model, micro_batch_size=2, grad_accum_steps=4, max_steps=1)
    assert out["loss"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert abs(out["loss"] - mean_of_means) > 1e-4


# ------------------------------------------------------------------------------ schedule / optimizer / config
def test_lr_schedule():
    cfg = TrainConfig("x", max_steps=10, lr=1.0, warmup_steps=2)
    assert [lr_at(s, cfg) for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_at(6, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_at(9, cfg) > 0
    constant = TrainConfig("x", max_steps=10, lr=0.3, lr_schedule="constant")
    assert {lr_at(s, constant) for s in range(10)} == {0.3}


@pytest.mark.parametrize("field,value,match", [
    ("max_steps", 0, "max_steps must be a positive int"),
    ("optimizer", "adam", "optimizer must be one of"),
    ("mixed_precision", "fp8", "mixed_precision must be one of"),
    ("zero", 2, "zero must be 0 or 1"),
    ("lr", -1.0, "lr must be a number >= 0"),
    ("warmup_steps", 11, "warmup_steps must be <= max_steps"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"output_dir": "x", "max_steps": 10, field: value})


def test_paged_adamw_needs_cuda(tmp_path):
    with pytest.raises(ValueError, match="paged_adamw.*needs a CUDA device"):
        Trainer(tiny_model(), TrainConfig(str(tmp_path), max_steps=1, optimizer="paged_adamw"), make_dataset(8))


def test_trainer_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        Trainer(tiny_model(), {"output_dir": "x"}, make_dataset(8))
    frozen = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(frozen, TrainConfig(str(tmp_path), max_steps=1), make_dataset(8))


def test_sgd_constant_lr_step_is_exact(tmp_path):
    """One SGD step without clipping: p -= lr * grad of the mean token loss."""
    data = make_dataset(8)
    model = tiny_model()
    before = snapshot(model)
    batch = pad_collate([data[i] for i in GlobalBatchOrder(8, 8, 0).global_batch(0)])
    loss = causal_lm_loss_sum(model(batch["input_ids"])[0], batch["labels"]) / count_targets(batch["labels"])
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    _train(tmp_path, "sgd", data, model=model, optimizer="sgd", lr=0.1, lr_schedule="constant",
           max_grad_norm=0.0, max_steps=1)
    for name, p in model.named_parameters():
        assert_close(p.detach(), before[name] - 0.1 * grads[name], atol=1e-6, rtol=1e-5, name=name)


@pytest.mark.parametrize("output", ["tuple", "object", "tensor"])
def test_model_output_kinds(tmp_path, output):
    data = make_dataset(8)
    reference, _, _ = _train(tmp_path, "ref", data, max_steps=2)
    model, _, _ = _train(tmp_path, output, data, model=tiny_model(output=output), max_steps=2)
    for name, p in snapshot(reference).items():
        assert torch.equal(snapshot(model)[name], p), name


def test_gradient_clipping_bounds_the_update_norm(tmp_path):
    """SGD with lr 1 moves the parameters by exactly the clipped gradient."""
    model = tiny_model()
    before = snapshot(model)
    _, out, _ = _train(tmp_path, "clip", make_dataset(8), model=model, optimizer="sgd", lr=1.0,
                       lr_schedule="constant", max_grad_norm=1e-3, max_steps=1)
    update = torch.sqrt(sum(((p.detach() - before[n]) ** 2).sum() for n, p in model.named_parameters()))
    record = read_metrics(tmp_path / "clip" / "metrics.jsonl")[0]
    assert record["grad_norm"] > 1e-2, "the gradient must be larger than the clipping threshold"
    assert update.item() == pytest.approx(1e-3, rel=1e-3)


# ------------------------------------------------------------------------------ gradient checkpointing
def test_gradient_checkpointing_same_gradients_less_activation_memory():
    from llmkern.train.memory import MemoryTracker

    batch = pad_collate(make_dataset(8, max_len=64, min_len=64, seed=2))
    grads, peaks = {}, {}
    for ckpt in (False, True):
        model = tiny_model(dim=64, layers=4)
        model.gradient_checkpointing = ckpt
        tracker = MemoryTracker("cpu")
        tracker.track(list(model.parameters()))
        with tracker:
            logits, _ = model(batch["input_ids"])
            loss = causal_lm_loss_sum(logits, batch["labels"]) / count_targets(batch["labels"])
            del logits
            saved = tracker.current
            loss.backward()
        peaks[ckpt] = saved
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads[False].items():
        assert_close(grads[True][name], g, atol=1e-6, rtol=1e-5, name=name)
    assert peaks[True] < 0.6 * peaks[False], peaks


def test_trainer_turns_gradient_checkpointing_on(tmp_path):
    model, _, _ = _train(tmp_path, "ckpt", make_dataset(8), max_steps=1, gradient_checkpointing=True)
    assert model.gradient_checkpointing is True
    with pytest.raises(ValueError, match="gradient checkpointing needs a model"):
        Trainer(torch.nn.Sequential(torch.nn.Embedding(5, 4)), TrainConfig(str(tmp_path), max_steps=1,
                gradient_checkpointing=True), make_dataset(8))


# ------------------------------------------------------------------------------ mixed precision
POISON = 36


class _Poisoned(torch.nn.Module):
    """TinyLM whose logits are multiplied by 1e4 for a batch holding token 36: the backward through that
    product overflows fp16 (an activation gradient above 65504) once the loss is scaled."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model()

    def forward(self, input_ids, attention_mask=None):
        logits, _ = self.inner(input_ids)
        return logits * (1e4 if bool((input_ids == POISON).any()) else 1.0)


def _poisoned_dataset(n_batches: int, poisoned: int) -> list[dict]:
    data = make_dataset(8 * n_batches, seed=5)
    for item in data:
        item["input_ids"] = item["input_ids"].clamp_max(POISON - 1)
    order = GlobalBatchOrder(len(data), 8, seed=0)
    victim = order.global_batch(poisoned)[0]
    data[victim]["input_ids"][0] = POISON
    return data


def test_fp16_overflow_skips_the_step_and_training_goes_on(tmp_path, caplog):
    data = _poisoned_dataset(4, poisoned=1)
    model = _Poisoned()
    before = snapshot(model)
    with caplog.at_level(logging.WARNING, logger="llmkern.train"):
        trainer = Trainer(model, TrainConfig(str(tmp_path), max_steps=4, micro_batch_size=8, lr=1e-2,
                                             mixed_precision="fp16", progress=False), data)
        out = trainer.train()
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss_scale" in r]
    assert [r["skipped"] for r in records] == [False, True, False, False]
    assert records[1]["loss_scale"] == records[0]["loss_scale"] / 2
    assert out["skipped_steps"] == 1
    assert "step 2: gradients are not finite" in caplog.text and "skipped the update" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved, "the steps after the overflow must update the parameters"


def test_fp16_skipped_step_leaves_parameters_untouched(tmp_path):
    data = _poisoned_dataset(2, poisoned=0)
    model = _Poisoned()
    before = snapshot(model)
    Trainer(model, TrainConfig(str(tmp_path), max_steps=1, micro_batch_size=8, mixed_precision="fp16",
                               progress=False), data).train()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    data = make_dataset(16, seed=3)
    fp32, out32, _ = _train(tmp_path, "fp32", data, micro_batch_size=4, max_steps=4)
    bf16, out16, _ = _train(tmp_path, "bf16", data, micro_batch_size=4, max_steps=4, mixed_precision="bf16")
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert out16["loss"] == pytest.approx(out32["loss"], rel=2e-2)
    differs = any(not torch.equal(a, b) for a, b in zip(fp32.parameters(), bf16.parameters()))
    assert differs, "bf16 autocast must change the arithmetic"


# ------------------------------------------------------------------------------ eval / metrics / reporting
def test_eval_loss_and_metrics_jsonl(tmp_path):
    data, eval_data = make_dataset(16, seed=1), make_dataset(5, seed=9)
    model, out, trainer = _train(tmp_path, "run", data, eval_data=eval_data, micro_batch_size=4, max_steps=4,
                                 eval_every=2, log_every=1)
    batch = pad_collate(eval_data)
    with torch.no_grad():
        expected = causal_lm_loss_sum(model(batch["input_ids"])[0], batch["labels"]).item() / count_targets(batch["labels"])
    assert out["eval_loss"] == pytest.approx(expected, rel=1e-5)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4]
    assert all({"lr", "grad_norm", "tokens", "tokens_per_s", "skipped"} <= set(r) for r in train)
    assert evals[-1]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert out["step"] == 4 and out["tokens"] == sum(r["tokens"] for r in train)


def test_start_report_prints_memory_estimate_and_measured_peak(tmp_path, capsys):
    _train(tmp_path, "run", make_dataset(8), max_steps=2, progress=True)
    text = capsys.readouterr()
    printed = text.out + text.err
    assert "trainable of" in printed
    assert "estimated peak memory" in printed
    assert "measured peak memory" in printed and "tensor-allocation tracker" in printed
    assert "it/s" in printed or "s/it" in printed  # the tqdm bar
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert records[-1]["step"] == 2 and json.dumps(records)


# ------------------------------------------------------------------------------ real models
def _llmkern_transformer(causal: bool):
    from llmkern.models import Transformer, TransformerConfig

    torch.manual_seed(0)
    return Transformer(TransformerConfig(vocab_size=37, dim=32, n_layers=2, n_heads=4, max_seq_len=32, causal=causal))


def _hf_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=37, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4))


@pytest.mark.end_to_end
@pytest.mark.parametrize("kind", ["llmkern-causal", "llmkern-encoder", "hf-llama"])
def test_first_step_loss_equals_the_models_own_loss(tmp_path, kind):
    """The trainer's loss convention (shifted for causal LMs, not for encoders) is the model's own."""
    import llmkern

    data = make_dataset(8, prompt_mask=False, min_len=12, max_len=12)
    batch = pad_collate(data)
    with llmkern.use_backend("reference"):
        model = _hf_llama() if kind == "hf-llama" else _llmkern_transformer(causal=kind == "llmkern-causal")
        with torch.no_grad():
            if kind == "hf-llama":
                own = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
            else:
                own = model(batch["input_ids"], labels=batch["labels"])[1].item()
        _train(tmp_path, kind, data, model=model, max_steps=1)
    record = read_metrics(tmp_path / kind / "metrics.jsonl")[0]
    assert record["loss"] == pytest.approx(own, rel=1e-5)
