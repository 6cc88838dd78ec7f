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
