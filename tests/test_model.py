"""llmkern.models.Transformer and llmkern.nn.Attention: numerics per backend, masks and positions, KV-cache
generation, gradient checkpointing, save/load, and (end to end) training on a small corpus."""
from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
import torch
from torch.nn import functional as F

import llmkern
from llmkern.models import Transformer, TransformerConfig
from llmkern.nn import Attention, KVCache
from tests._numerics import assert_close, assert_kernel_close

VARIANTS = {
    "llama": dict(n_kv_heads=2),
    "gpt2": dict(norm="layernorm", positions="learned", mlp="gelu", bias=True, tie_embeddings=True),
    "bert": dict(causal=False, norm="layernorm", positions="sinusoidal", mlp="gelu", bias=True),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes: one intra-op thread is faster than two (no fork/join per op), and far faster on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> TransformerConfig:
    return TransformerConfig(**{**dict(vocab_size=48, dim=32, n_layers=2, n_heads=4, max_seq_len=32), **overrides})


def randomize_norms(model: torch.nn.Module) -> None:
    """Norm weights away from their init (ones/zeros), so a lost weight or bias shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(0.5 if name.endswith("weight") else 0.0, 0.3)


def run(model, ids, mask, labels, grad_out):
    """Logits, loss and parameter gradients of ``(logits * grad_out).sum() + loss``."""
    model.zero_grad()
    logits, loss = model(ids, labels=labels, attention_mask=mask)
    ((logits * grad_out.to(logits.dtype)).sum() + loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return logits.detach(), loss.detach(), grads


# ----------------------------------------------------------------------------------------------- numerics

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformer_matches_reference(backend, variant):
    """Logits, loss and every parameter gradient on the backend, against the model run by the pure-torch
    reference backend in float64 (reference) and float32 (baseline): DESIGN.md's 2x rule."""
    model = Transformer(tiny(**VARIANTS[variant])).to(backend.device)
    randomize_norms(model)
    ids = torch.randint(0, 48, (2, 11), device=backend.device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                           # left padding on row 1
    labels = ids.masked_fill(mask == 0, -100)
    grad_out = torch.randn(2, 11, 48, device=backend.device)

    actual = run(model, ids, mask, labels, grad_out)
    with llmkern.use_backend("reference"):
        reference = run(copy.deepcopy(model).double(), ids, mask, labels, grad_out)
        baseline = run(copy.deepcopy(model), ids, mask, labels, grad_out)

    assert_kernel_close(actual[0], reference[0], baseline[0], name=f"{variant} logits")
    assert_kernel_close(actual[1], reference[1], baseline[1], name=f"{variant} loss")
    for name in actual[2]:
        assert_kernel_close(actual[2][name], reference[2][name], baseline[2][name], name=f"{variant} d{name}")


# ------------------------------------------------------------------------------------- masks and positions

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causality(variant):
    model = Transformer(tiny(**VARIANTS[variant])).eval()
    ids = torch.randint(0, 48, (1, 10))
    changed = ids.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 48
    a, _ = model(ids)
    b, _ = model(changed)
    past_equal = torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert past_equal == model.config.causal, "past logits must ignore future tokens exactly when causal"
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-3)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_left_padding_matches_unpadded(variant):
    """Padded keys are hidden and positions count real tokens only, so a left-padded row's logits equal
    those of the row alone."""
    model = Transformer(tiny(**VARIANTS[variant])).eval()
    short = torch.randint(0, 48, (1, 6))
    padded = torch.cat((torch.zeros(1, 4, dtype=torch.long), short), dim=1)
    mask = torch.cat((torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)), dim=1)
    alone, _ = model(short)
    batched, _ = model(padded, attention_mask=mask)
    assert_close(batched[:, 4:], alone, atol=1e-5, name="left-padded logits")


def test_causal_loss_is_shifted_and_ignores_minus_100():
    model = Transformer(tiny())
    ids = torch.randint(0, 48, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    logits, loss = model(ids, labels=labels)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 48), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(loss, expected, atol=1e-6, name="causal loss")


def test_encoder_loss_is_not_shifted():
    model = Transformer(tiny(causal=False, positions="learned"))
    ids = torch.randint(0, 48, (2, 9))
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    logits, loss = model(ids, labels=labels)
    assert_close(loss, F.cross_entropy(logits[:, 2], ids[:, 2]), atol=1e-6, name="masked-LM loss")


def test_loss_with_no_targets_is_zero():
    model = Transformer(tiny())
    logits, loss = model(torch.randint(0, 48, (1, 5)), labels=torch.full((1, 5), -100))
    assert loss.item() == 0.0 and logits.shape == (1, 5, 48)


def test_num_parameters_and_tying():
    d, v, h, n = 32, 48, 4 * 32, 2
    untied = Transformer(tiny(norm="layernorm", positions="learned", mlp="gelu", bias=True))
    per_layer = 4 * (d * d + d) + (d * h + h) + (h * d + d) + 2 * 2 * d
    expected = v * d + 32 * d + n * per_layer + 2 * d + v * d
    assert untied.num_parameters() == expected
    assert untied.num_parameters(exclude_embeddings=True) == expected - v * d - 32 * d
    tied = Transformer(tiny(norm="layernorm", positions="learned", mlp="gelu", bias=True, tie_embeddings=True))
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert tied.num_parameters() == expected - v * d


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="dim must be divisible by n_heads"):
        tiny(dim=30)
    with pytest.raises(ValueError, match="n_heads must be a multiple of n_kv_heads"):
        tiny(n_kv_heads=3)
    with pytest.raises(ValueError, match="positions must be one of"):
        tiny(positions="alibi")
    with pytest.raises(ValueError, match="unknown fields"):
        TransformerConfig.from_dict({**tiny().to_dict(), "n_experts": 8})
    model = Transformer(tiny())
    with pytest.raises(ValueError, match="input_ids must be a \\(B, L\\) int64 tensor"):
        model(torch.randn(2, 5))
    with pytest.raises(ValueError, match="exceed max_seq_len 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="needs a causal model"):
        Transformer(tiny(causal=False)).generate(torch.zeros(1, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 3)


# ----------------------------------------------------------------------------------- gradient checkpointing

def test_gradient_checkpointing_gives_the_same_gradients():
    """Non-reentrant recomputation with the RNG state preserved: identical gradients, dropout included."""
    model = Transformer(tiny(dropout=0.1, n_kv_heads=2)).train()
    ids = torch.randint(0, 48, (2, 6))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(1)
        _, loss = model(ids, labels=ids)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], atol=1e-6, name=f"checkpointed d{name}")


@pytest.mark.end_to_end
def test_gradient_checkpointing_with_qlora_layers():
    """prepare_model swaps every projection for LoRA over NF4 and turns checkpointing on; the adapters get the
    gradients they get without checkpointing."""
    from llmkern.qlora import lora_layers, prepare_model

    model = prepare_model(Transformer(tiny(n_kv_heads=2)), r=4, lora_alpha=8)
    assert model.gradient_checkpointing
    assert len(lora_layers(model)) == 2 * 7                   # q, k, v, o, gate, up, down in each block
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.normal_(std=0.1)                             # B starts at 0, which would leave dA = 0
    ids = torch.randint(0, 48, (2, 8))
    grads = []
    for checkpointing in (True, False):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        _, loss = model(ids, labels=ids)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0] and all("lora_" in n for n in grads[0])
    for name in grads[0]:
        assert grads[0][name].abs().max() > 0, name
        assert_close(grads[0][name], grads[1][name], atol=1e-6, name=f"checkpointed QLoRA d{name}")
    prompt = ids[:, :3]
    assert torch.equal(model.generate(prompt, 5), model.generate(prompt, 5, use_cache=False))


# ------------------------------------------------------------------------------------------------ generate

# Generation loops call every kernel once per token; the interpreted-Triton pass runs one case (greedy Llama,
# which exercises the decode attention path), the default pass all of them.
SAMPLED = dict(temperature=0.8, top_k=10, top_p=0.9)


@pytest.mark.parametrize("variant, sampling", [
    pytest.param("llama", {}, id="greedy-llama"),
    pytest.param("llama", SAMPLED, id="sampled-llama", marks=pytest.mark.end_to_end),
    pytest.param("gpt2", {}, id="greedy-gpt2", marks=pytest.mark.end_to_end),
    pytest.param("gpt2", SAMPLED, id="sampled-gpt2", marks=pytest.mark.end_to_end),
])
def test_kv_cache_generation_equals_full_recompute(variant, sampling):
    model = Transformer(tiny(**VARIANTS[variant]))
    prompt = torch.randint(0, 48, (2, 5))
    outs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(3)
        outs.append(model.generate(prompt, 8, use_cache=use_cache, generator=generator, **sampling))
    assert outs[0].shape == (2, 13)
    assert torch.equal(outs[0][:, :5], prompt)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.end_to_end
def test_generation_of_left_padded_batch_equals_each_row_alone():
    model = Transformer(tiny(n_kv_heads=2))
    a, b = torch.randint(0, 48, (1, 6)), torch.randint(0, 48, (1, 3))
    batch = torch.cat((a, torch.cat((torch.zeros(1, 3, dtype=torch.long), b), dim=1)))
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = model.generate(batch, 6, attention_mask=mask)
    assert torch.equal(out[0], model.generate(a, 6)[0])
    assert torch.equal(out[1, 3:], model.generate(b, 6)[0])


@pytest.mark.end_to_end
def test_eos_stops_rows_and_generation():
    model = Transformer(tiny())
    prompt = torch.randint(0, 48, (1, 4))
    free = model.generate(prompt, 8)
    eos = int(free[0, 6])                       # the third generated token
    out = model.generate(prompt, 8, eos_token_id=eos)
    stop = 4 + int((free[0, 4:] == eos).nonzero()[0])
    assert torch.equal(out[0], free[0, :stop + 1])


@pytest.mark.end_to_end
def test_top_k_one_is_greedy():
    model = Transformer(tiny())
    prompt = torch.randint(0, 48, (2, 4))
    assert torch.equal(model.generate(prompt, 6, temperature=1.0, top_k=1), model.generate(prompt, 6))


# ---------------------------------------------------------------------------------------------- save / load

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_save_load_round_trip(tmp_path, variant, dtype):
    model = Transformer(tiny(**VARIANTS[variant])).to(dtype)
    randomize_norms(model)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llmkern-transformer"
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert loaded.embed_tokens.weight.dtype == dtype
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == model.config.tie_embeddings
    for (n, p), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    ids = torch.randint(0, 48, (2, 7))
    assert torch.equal(model(ids)[0], loaded(ids)[0])


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)
    Transformer(tiny()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        Transformer.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------ the Attention module

def plain_attention(attn: Attention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The same computation in plain torch: projections, Llama's rotate_half RoPE, repeated KV, torch SDPA."""
    b, l, _ = x.shape
    h, hk, e = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(b, l, h, e).transpose(1, 2)
    k = attn.k_proj(x).view(b, l, hk, e).transpose(1, 2)
    v = attn.v_proj(x).view(b, l, hk, e).transpose(1, 2)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, e, 2, dtype=torch.float64) / e)
    angles = positions.double()[:, None] * inv_freq
    cos, sin = torch.cat((angles, angles), -1).cos().to(x.dtype), torch.cat((angles, angles), -1).sin().to(x.dtype)

    def rotate(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-t2, t1), -1) * sin

    q, k = rotate(q), rotate(k)
    k, v = k.repeat_interleave(h // hk, dim=1), v.repeat_interleave(h // hk, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=attn.causal)
    return attn.o_proj(out.transpose(1, 2).reshape(b, l, h * e))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_module_matches_plain_torch(backend, n_kv_heads):
    attn = Attention(32, 4, n_kv_heads, rope=True).to(backend.device)
    x = torch.randn(2, 9, 32, device=backend.device, requires_grad=True)
    out = attn(x)
    out.backward(torch.ones_like(out))
    grads = [x.grad.clone()] + [p.grad.clone() for p in attn.parameters()]
    attn.zero_grad()
    x.grad = None
    expected = plain_attention(attn, x, torch.arange(9, device=backend.device))
    expected.backward(torch.ones_like(expected))
    assert_close(out, expected, atol=1e-5, rtol=1e-4, name="attention output")
    for got, want in zip(grads, [x.grad] + [p.grad for p in attn.parameters()]):
        assert_close(got, want, atol=1e-5, rtol=1e-4, name="attention gradient")


def test_attention_rope_matches_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, attn_implementation="sdpa")
    hf = LlamaAttention(config, layer_idx=0).eval()
    ours = Attention(32, 4, 2, rope=True, rope_theta=config.rope_parameters["rope_theta"]).eval()
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 9, 32)
    position_ids = torch.arange(9)[None].expand(2, -1)
    expected, _ = hf(x, position_embeddings=LlamaRotaryEmbedding(config)(x, position_ids), attention_mask=None)
    assert_close(ours(x), expected, atol=1e-5, rtol=1e-4, name="llmkern vs Hugging Face LlamaAttention")


@pytest.mark.parametrize("chunks", [[9], [5, 1, 1, 1, 1], [3, 4, 2]], ids=["prefill", "decode", "chunked"])
def test_attention_kv_cache_equals_full_sequence(chunks):
    attn = Attention(32, 4, 2, rope=True).eval()
    x = torch.randn(2, 9, 32)
    full = attn(x)
    cache = attn.new_kv_cache(2, 16)
    parts, start = [], 0
    with torch.no_grad():
        for n in chunks:
            parts.append(attn(x[:, start:start + n], kv_cache=cache))
            start += n
    assert cache.length == 9
    assert_close(torch.cat(parts, dim=1), full, atol=1e-5, name="cached attention")


def test_attention_errors():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        Attention(32, 4, 3)
    with pytest.raises(ValueError, match="head_dim must be even"):
        Attention(30, 2, rope=True)
    cache = KVCache(1, 2, 4, 8)
    with pytest.raises(ValueError, match="do not fit in a cache of max_len 4"):
        cache.update(torch.zeros(1, 2, 5, 8), torch.zeros(1, 2, 5, 8))


# ---------------------------------------------------------------------------------------------- end to end

CORPUS = (
    "the quick brown fox jumps over the lazy dog. "
    "a journey of a thousand miles begins with a single step. "
    "all that glitters is not gold. "
    "to be or not to be, that is the question. "
    "the early bird catches the worm. "
    "actions speak louder than words. "
    "where there is a will there is a way. "
    "knowledge is power and time is money. "
) * 4


@pytest.mark.end_to_end
def test_transformer_learns_small_corpus():
    """Character-level LM on an embedded corpus: within 200 CPU steps the training loss falls far below the
    unigram entropy (the best a model that ignores context can reach)."""
    vocab = sorted(set(CORPUS))
    data = torch.tensor([vocab.index(c) for c in CORPUS])
    freq = torch.tensor(list(Counter(CORPUS).values()), dtype=torch.float64) / len(CORPUS)
    unigram_entropy = float(-(freq * freq.log()).sum())                                   # nats

    config = TransformerConfig(vocab_size=len(vocab), dim=48, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        starts = torch.randint(0, len(data) - 48, (8,), generator=generator)
        batch = torch.stack([data[s:s + 48] for s in starts])
        _, loss = model(batch, labels=batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    final = sum(losses[-20:]) / 20
    assert losses[0] > 0.9 * math.log(len(vocab)), f"initial loss {losses[0]:.3f} should be near log(V)"
    assert final < 0.25 * unigram_entropy, f"loss {final:.3f} not well below the unigram entropy {unigram_entropy:.3f}"
