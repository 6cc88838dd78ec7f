import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
TOKENIZER_DIR = os.path.join(SHARED, "tokenizers", "deepseek-r1-distill-qwen")
OLD_TEMPLATE = os.path.join(SHARED, "tokenizers", "deepseek-r1-distill-qwen-2025-01-template", "chat_template.jinja")
HH_PAIRS = os.path.join(SHARED, "data", "hh-rlhf-harmless-base", "pairs-2000.jsonl.gz")

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one thread per worker (and per process it starts), so
    os.environ["OMP_NUM_THREADS"] = "1"     # N workers share the cores instead of oversubscribing them, where
    torch.set_num_threads(1)                # OpenMP's waiting threads slow every worker down many times over


def small_qwen2(vocab_size: int = 128, seed: int = 0):
    """A random 2-layer Qwen2ForCausalLM with a small vocabulary, for unit tests (no tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model("qwen2", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    return model


@pytest.fixture(scope="session")
def deepseek_tokenizer_dir():
    if not os.path.isdir(TOKENIZER_DIR):
        pytest.skip(f"needs the DeepSeek-R1-Distill-Qwen tokenizer at {TOKENIZER_DIR} (../shared beside the repo)")
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, deepseek_tokenizer_dir):
    """A random tiny Qwen2 with the real DeepSeek tokenizer, saved like a hub checkpoint."""
    from model_loader import build_tiny_qwen2
    return build_tiny_qwen2(str(tmp_path_factory.mktemp("tiny_qwen2")), deepseek_tokenizer_dir, hidden_size=32)


def make_model(learnable=True, structure="linear", grad_to_policy=False, seed=0):
    """A DynamicBetaDPOModel on small_qwen2: a BetaHead off its zero init (or fixed beta), the policy
    moved off its frozen reference."""
    from beta_head import BetaHead, DynamicBetaDPOModel
    from model_loader import frozen_copy
    policy = small_qwen2(seed=seed)
    head = None
    if learnable:
        torch.manual_seed(seed + 1)
        head = BetaHead(policy.config.hidden_size, structure, epsilon=0.5, mlp_hidden_size=16)
        for p in head.nn.parameters():  # off zero-init, so f(h) really depends on h
            torch.nn.init.normal_(p, std=0.5)
        with torch.no_grad():
            head.log_w.fill_(math.log(1e-3))
    reference = frozen_copy(policy)
    with torch.no_grad():  # policy != reference, so margins (and dL/dbeta) are not all zero
        g = torch.Generator().manual_seed(seed + 2)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return DynamicBetaDPOModel(policy, head, reference, beta=0.1, beta_grad_to_policy=grad_to_policy)


def pairs(seed=0):
    """Three random pairs of token ids (prompts, responses of different lengths)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    return [dict(prompt_ids=rand(5), chosen_ids=rand(4), rejected_ids=rand(7)),
            dict(prompt_ids=rand(9), chosen_ids=rand(3), rejected_ids=rand(2)),
            dict(prompt_ids=rand(2), chosen_ids=rand(6), rejected_ids=rand(5))]
