"""QLoRA preparation on a tiny Hugging Face Llama and the llmkern Transformer; adapters in PEFT's format."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import llmkern
from llmkern import qlora
from llmkern.nn import LinearNF4, LoRALinear
from llmkern.train import TrainConfig, Trainer
from tests._numerics import assert_close
from tests._train_utils import make_dataset, single_thread  # noqa: F401 (single_thread: autouse)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = [pytest.mark.end_to_end,
              pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]

VOCAB = 37
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def reference_backend():
    with llmkern.use_backend("reference"):
        yield


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qlora.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))


def test_prepare_hf_llama_structure():
    model = qlora.prepare_model(tiny_llama(), r=4, lora_alpha=8)
    layers = qlora.lora_layers(model)
    assert sorted(layers) == sorted(f"model.layers.{i}.{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}"
                                    for i in range(2) for n in LINEARS)
    assert all(isinstance(m.base_layer, LinearNF4) for m in layers.values())
    assert type(model.lm_head) is torch.nn.Linear and not model.lm_head.weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n or "norm" in n)
    assert model.is_activation_checkpointing
    with pytest.raises(ValueError, match="already has LoRA layers"):
        qlora.prepare_model(model)


def test_prepare_casts_half_norms_to_fp32():
    model = qlora.prepare_model(tiny_llama().to(torch.bfloat16), r=2, quantize=False, gradient_checkpointing=False)
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_qlora_training_on_hf_llama_changes_only_adapters(tmp_path):
    model = qlora.prepare_model(tiny_llama(), r=4, lora_alpha=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(str(tmp_path), max_steps=2, micro_batch_size=4, lr=1e-2, progress=False, report_memory=False)
    Trainer(model, cfg, make_dataset(8, vocab=VOCAB)).train()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed nothing"
    assert all(".lora_A." in k or ".lora_B." in k for k in changed), sorted(changed)
    assert sum(".lora_B." in k for k in changed) == 14, "every lora_B must receive gradients through checkpointing"


def test_adapter_round_trips_through_peft(tmp_path):
    base = tiny_llama()
    model = qlora.prepare_model(copy.deepcopy(base), r=4, lora_alpha=8, quantize=False)
    randomize_adapters(model)
    expected = logits(model, IDS)
    assert (expected - logits(base, IDS)).abs().max() > 1e-3, "the adapters must change the output"
    path = qlora.save_adapter(model, tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(LINEARS)
    loaded_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    assert_close(logits(loaded_by_peft, IDS), expected, atol=1e-6, rtol=1e-5, name="PEFT")
    loaded_by_us = qlora.load_adapter(copy.deepcopy(base), path)
    assert torch.equal(logits(loaded_by_us, IDS), expected)


def test_adapter_saved_by_peft_loads_into_prepared_model(tmp_path):
    base = tiny_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(str(tmp_path))
    ours = qlora.prepare_model(copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               quantize=False, gradient_checkpointing=False)
    qlora.load_adapter(ours, tmp_path)
    assert_close(logits(ours, IDS), logits(peft_model.eval(), IDS), atol=1e-6, rtol=1e-5, name="PEFT->llmkern")
    wrong_rank = qlora.prepare_model(copy.deepcopy(base), r=2, target_modules=["q_proj", "v_proj"], quantize=False)
    with pytest.raises(ValueError, match="has r=2"):
        qlora.load_adapter(wrong_rank, tmp_path)


def test_qlora_adapter_matches_peft_over_the_dequantized_base(tmp_path):
    base = tiny_llama()
    model = qlora.prepare_model(copy.deepcopy(base), r=4, lora_alpha=8)
    randomize_adapters(model)
    path = qlora.save_adapter(model, tmp_path)
    dequantized = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in qlora.lora_layers(model).items():
            dequantized.get_submodule(name).weight.copy_(layer.base_layer.dequantize(torch.float32))
    loaded = peft.PeftModel.from_pretrained(dequantized, str(path)).eval()
    assert_close(logits(model, IDS), logits(loaded, IDS), atol=1e-5, rtol=1e-4, name="QLoRA vs PEFT")


def test_rank_pattern_round_trip(tmp_path):
    base = tiny_llama()
    model = qlora.prepare_model(copy.deepcopy(base), r=4, lora_alpha=8, quantize=False, gradient_checkpointing=False)
    name = "model.layers.1.mlp.down_proj"
    special = LoRALinear(model.get_submodule(name).base_layer, r=2, lora_alpha=3)
    model.model.layers[1].mlp.down_proj = special
    randomize_adapters(model)
    path = qlora.save_adapter(model, tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {name: 2} and config["alpha_pattern"] == {name: 3}
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    assert_close(logits(loaded, IDS), logits(model, IDS), atol=1e-6, rtol=1e-5, name="rank_pattern")


def test_target_modules_selection():
    model = qlora.prepare_model(tiny_llama(), r=2, target_modules=["q_proj", "v_proj"], quantize=False)
    assert {n.rsplit(".", 1)[1] for n in qlora.lora_layers(model)} == {"q_proj", "v_proj"}
    regex = qlora.prepare_model(tiny_llama(), r=2, target_modules=r"model\.layers\.0\.mlp\..*", quantize=False)
    assert sorted(qlora.lora_layers(regex)) == [f"model.layers.0.mlp.{n}" for n in ("down_proj", "gate_proj", "up_proj")]
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        qlora.prepare_model(tiny_llama(), target_modules=["nope"])
    with pytest.raises(TypeError, match="target_modules must be"):
        qlora.prepare_model(tiny_llama(), target_modules=3)
    with pytest.raises(ValueError, match="r must be an int >= 1"):
        qlora.prepare_model(tiny_llama(), r=0)


def test_partial_targets_are_saved_as_an_exact_regex(tmp_path):
    base = tiny_llama()
    model = qlora.prepare_model(copy.deepcopy(base), r=2, target_modules=r"model\.layers\.0\.self_attn\.q_proj",
                                quantize=False)
    randomize_adapters(model)
    path = qlora.save_adapter(model, tmp_path)
    assert isinstance(json.loads((path / "adapter_config.json").read_text())["target_modules"], str)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    assert_close(logits(loaded, IDS), logits(model, IDS), atol=1e-6, rtol=1e-5, name="regex targets")


@pytest.mark.parametrize("quantize", [False, True])
def test_merge_and_unmerge(quantize):
    model = qlora.prepare_model(tiny_llama(), r=4, lora_alpha=8, quantize=quantize, gradient_checkpointing=False)
    randomize_adapters(model)
    expected = logits(model, IDS)
    assert qlora.merge(model) == 14
    assert all(m.merged for m in qlora.lora_layers(model).values())
    assert_close(logits(model, IDS), expected, atol=1e-5, rtol=1e-4, name="merged")
    assert qlora.unmerge(model) == 14
    assert_close(logits(model, IDS), expected, atol=1e-5, rtol=1e-4, name="unmerged")


def test_print_trainable_parameters(capsys):
    dense = tiny_llama()
    n_dense = sum(p.numel() for p in dense.parameters())
    model = qlora.prepare_model(dense, r=4, gradient_checkpointing=False)
    trainable, total = qlora.print_trainable_parameters(model)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable == n_lora and total == n_dense + n_lora
    assert f"trainable params: {n_lora:,d} || all params: {total:,d}" in capsys.readouterr().out


def test_load_adapter_rejects_what_it_cannot_express(tmp_path):
    model = qlora.prepare_model(tiny_llama(), r=2, quantize=False, gradient_checkpointing=False)
    path = qlora.save_adapter(model, tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        qlora.load_adapter(tiny_llama(), path)
    with pytest.raises(ValueError, match="does not exist"):
        qlora.load_adapter(tiny_llama(), tmp_path / "missing")
    with pytest.raises(ValueError, match="no LoRA layers"):
        qlora.save_adapter(tiny_llama(), tmp_path / "none")


def test_llmkern_transformer_qlora(tmp_path):
    from llmkern.models import Transformer, TransformerConfig

    def fresh():
        torch.manual_seed(0)
        return Transformer(TransformerConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                             max_seq_len=64))

    model = qlora.prepare_model(fresh(), r=4, lora_alpha=8)
    assert model.gradient_checkpointing is True
    assert isinstance(model.layers[0].attention.q_proj.base_layer, LinearNF4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(str(tmp_path / "run"), max_steps=2, micro_batch_size=4, lr=1e-2, progress=False,
                      report_memory=False)
    Trainer(model, cfg, make_dataset(8, vocab=VOCAB)).train()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(".lora_" in k for k in changed), sorted(changed)
    path = qlora.save_adapter(model, tmp_path / "adapter")
    reloaded = qlora.load_adapter(qlora.prepare_model(fresh(), r=4, lora_alpha=8), path)
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(IDS)[0], reloaded(IDS)[0])
