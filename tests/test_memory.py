"""Memory: the allocation tracker, the estimator against measured peaks, and QLoRA vs full fine-tuning."""
from __future__ import annotations

import pytest
import torch

import llmkern
from llmkern.train import memory
from llmkern.train.loss import causal_lm_loss_sum, logits_of
from llmkern.train.precision import autocast
from tests._train_utils import single_thread  # noqa: F401 (autouse fixture)


# ------------------------------------------------------------------------------ tracker
def test_tracker_counts_live_storages():
    tracker = memory.MemoryTracker("cpu")
    existing = torch.zeros(100)
    tracker.track([existing, existing[10:]])
    assert tracker.current == 400
    with tracker:
        a = torch.empty(1000)                   # +4000
        view = a[100:].view(30, 30)             # a view: no new storage
        a.add_(1)                               # in place: no new storage
        b = a * 2                               # +4000
        assert tracker.current == 8400
        del a, view                             # freed: -4000
        assert tracker.current == 4400
        c = torch.empty(10, dtype=torch.float64)  # +80
        c.resize_(20)                           # grows to 160
    assert tracker.current == 4560
    assert tracker.peak == 8400
    del b, c
    assert tracker.current == 400


def test_tracker_sees_the_backward():
    w = torch.randn(64, 256, requires_grad=True)
    x = torch.randn(32, 256)
    tracker = memory.MemoryTracker("cpu")
    tracker.track([w, x])
    with tracker:
        y = torch.relu(x @ w.t())               # saved: relu output (32 x 64)
        loss = y.sum()
        loss.backward()                          # w.grad: 64 x 256
    assert w.grad is not None
    assert tracker.current >= (64 * 256 * 2 + 32 * 256) * 4
    assert tracker.peak >= tracker.current + 32 * 64 * 4


def test_peak_memory_context():
    existing = torch.zeros(250)
    with memory.PeakMemory("cpu", [existing]) as pm:
        t = torch.ones(1000)
        del t
    assert pm.peak_bytes == 1000 + 4000


def test_format_bytes():
    assert memory.format_bytes(512) == "512 B"
    assert memory.format_bytes(1536) == "1.50 KiB"
    assert memory.format_bytes(3 * 2**30) == "3.00 GiB"


# ------------------------------------------------------------------------------ estimator from a shape
LLAMA2_7B = memory.ModelShape(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                              style="hf")


def test_shape_parameter_count_matches_llama2_7b():
    assert LLAMA2_7B.num_parameters() == 6_738_415_616


def test_estimate_model_states_from_shape():
    n = LLAMA2_7B.num_parameters()
    full = memory.estimate(LLAMA2_7B, batch_size=1, seq_len=512)
    assert full.parameters == 4 * n
    assert full.optimizer == 8 * n
    bf16 = memory.estimate(LLAMA2_7B, batch_size=1, seq_len=512, param_dtype=torch.bfloat16, optimizer="sgd")
    assert bf16.parameters == 2 * n and bf16.optimizer == 0
    qlora = memory.estimate(LLAMA2_7B, batch_size=1, seq_len=512, method="qlora", lora_r=16,
                            param_dtype=torch.bfloat16, gradient_checkpointing=True)
    n_lora = 32 * 16 * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert qlora.optimizer == 8 * n_lora
    linear = n - 2 * 32000 * 4096 - 65 * 4096
    assert qlora.parameters == int(linear * (0.5 + 1 / 64 + 4 / 16384) + (n - linear) * 2 + 4 * n_lora)
    assert qlora.total < 0.1 * full.total
    lora = memory.estimate(LLAMA2_7B, batch_size=1, seq_len=512, method="lora", param_dtype=torch.bfloat16)
    assert qlora.parameters < 0.35 * lora.parameters


def test_estimate_activations_scale_and_checkpointing():
    small = memory.estimate(LLAMA2_7B, batch_size=1, seq_len=512, mixed_precision="bf16")
    large = memory.estimate(LLAMA2_7B, batch_size=4, seq_len=512, mixed_precision="bf16")
    ckpt = memory.estimate(LLAMA2_7B, batch_size=4, seq_len=512, mixed_precision="bf16", gradient_checkpointing=True)
    assert large.activations > 3 * small.activations
    assert ckpt.activations < 0.2 * large.activations
    assert ckpt.total < large.total


def test_estimate_sharding():
    one = memory.estimate(LLAMA2_7B, batch_size=1, seq_len=256)
    zero = memory.estimate(LLAMA2_7B, batch_size=1, seq_len=256, world_size=4, zero=1)
    fsdp = memory.estimate(LLAMA2_7B, batch_size=1, seq_len=256, world_size=4, fsdp=True)
    assert zero.optimizer == one.optimizer // 4 and zero.parameters == one.parameters
    assert fsdp.parameters == one.parameters // 4 and fsdp.optimizer == one.optimizer // 4


@pytest.mark.parametrize("kwargs,match", [
    ({"batch_size": 0, "seq_len": 8}, "batch_size and seq_len must be >= 1"),
    ({"batch_size": 1, "seq_len": 8, "mixed_precision": "fp8"}, "mixed_precision must be"),
    ({"batch_size": 1, "seq_len": 8, "optimizer": "adam"}, "optimizer must be"),
    ({"batch_size": 1, "seq_len": 8, "method": "dora"}, "method must be one of"),
])
def test_estimate_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        memory.estimate(LLAMA2_7B, **kwargs)


def test_estimate_without_shape_covers_model_states():
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 5))
    est = memory.estimate(model, batch_size=2, seq_len=3)
    n = sum(p.numel() for p in model.parameters())
    assert est.activations is None and est.parameters == 4 * n and est.optimizer == 8 * n
    assert "activations unknown" in str(est)


# ------------------------------------------------------------------------------ estimate vs measurement
def _transformer(method: str, checkpointing: bool, vocab: int = 512):
    from llmkern.models import Transformer, TransformerConfig
    from llmkern.qlora import prepare_model

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=vocab, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                                          hidden_dim=352, max_seq_len=128))
    if method != "full":
        prepare_model(model, r=8, lora_alpha=16, quantize=method == "qlora", gradient_checkpointing=False)
    model.gradient_checkpointing = checkpointing
    return model


def _hf_llama(method: str, checkpointing: bool):
    transformers = pytest.importorskip("transformers")
    from llmkern.qlora import enable_gradient_checkpointing, prepare_model

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False)).train()
    if method != "full":
        prepare_model(model, r=8, lora_alpha=16, quantize=method == "qlora", gradient_checkpointing=False)
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model


def measure_step_peak(model, batch_size: int, seq_len: int, mixed_precision: str = "no") -> int:
    """Peak bytes of a steady-state AdamW step (the second one), as the trainer runs it."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    vocab = model.config.vocab_size

    def step():
        ids = torch.randint(0, vocab, (batch_size, seq_len))
        with autocast(mixed_precision, torch.device("cpu")):
            logits = logits_of(model(input_ids=ids))
        loss = causal_lm_loss_sum(logits, ids) / ids.numel()
        del logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    existing = memory.model_tensors(model) + [v for s in opt.state.values() for v in s.values()]
    with memory.PeakMemory("cpu", existing) as pm:
        step()
    return pm.peak_bytes


CASES = [("llmkern", "full", False, "no"), ("llmkern", "full", True, "no"), ("llmkern", "lora", False, "no"),
         ("llmkern", "lora", True, "no"), ("llmkern", "qlora", False, "no"), ("llmkern", "qlora", True, "no"),
         ("llmkern", "full", False, "bf16"), ("llmkern", "full", True, "bf16"),
         ("hf", "full", False, "no"), ("hf", "qlora", True, "no")]


@pytest.mark.end_to_end
@pytest.mark.parametrize("model_kind,method,checkpointing,mixed_precision", CASES,
                         ids=["-".join([k, m, "ckpt" if c else "nockpt", p]) for k, m, c, p in CASES])
def test_estimate_within_15_percent_of_measured_peak(model_kind, method, checkpointing, mixed_precision):
    with llmkern.use_backend("reference"):
        model = (_transformer if model_kind == "llmkern" else _hf_llama)(method, checkpointing)
        measured = measure_step_peak(model, batch_size=4, seq_len=128, mixed_precision=mixed_precision)
    est = memory.estimate(model, batch_size=4, seq_len=128, mixed_precision=mixed_precision)
    error = (est.total - measured) / measured
    print(f"\n{model_kind} {method} checkpointing={checkpointing} {mixed_precision}: measured "
          f"{memory.format_bytes(measured)}, estimated {est}, error {100 * error:+.1f}%")
    assert abs(error) <= 0.15, (measured, est)


@pytest.mark.end_to_end
def test_qlora_with_checkpointing_needs_far_less_memory_than_full_finetuning():
    with llmkern.use_backend("reference"):
        full = measure_step_peak(_transformer("full", False, vocab=2048), batch_size=4, seq_len=128)
        qlora = measure_step_peak(_transformer("qlora", True, vocab=2048), batch_size=4, seq_len=128)
    ratio = qlora / full
    print(f"\nQLoRA + checkpointing peak {memory.format_bytes(qlora)} vs full fine-tuning {memory.format_bytes(full)}: "
          f"ratio {ratio:.3f}")
    assert ratio < 0.5
