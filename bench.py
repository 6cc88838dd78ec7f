"""
Training-step benchmark: our fused DPO step against the seed's literal design and TRL's DPOTrainer.

    python bench.py                    # SmolLM2-135M-Instruct, 4 HH-RLHF pairs x <=256 tokens, fp32 and bf16, CPU
    python bench.py --memory_sweep     # peak RSS vs sequence length, tiny Qwen2 with the 151,936 vocabulary
    python bench.py --profile          # where one ours-learnable step spends its time
    python bench.py --device cuda --arch ../shared/models/deepseek-r1-distill-qwen-1.5b   # the 1.5B target on a GPU

Every config runs in its own process (so its peak RSS is its own), on the same model weights,
the same pairs in the same order, batch shape, precision, seed and thread count; the configs run
in rounds, order rotated each round. Throughputs are medians over all measured steps; ratios are
medians over steps of paired ratios (the same batch in the same round), which cancels the spread
between batches and slow drifts of the machine's speed. One step = forward, backward,
clip_grad_norm_ (1.0), fused AdamW step (train.py's and TRL's default), zero_grad:

  ours-fixed / ours-learnable   DynamicBetaDPOModel (beta_head None / BetaHead): one forward in which each
                                pair's prompt runs once for both responses, packed without padding
  ours-unshared                 ours-learnable with share_prompt=False (train.py --no_prompt_sharing): the
                                padded concatenated (2B, T) forward, each prompt twice
  ours-unfused                  ours-learnable with Hugging Face's own MLP and RMSNorm forwards (train.py
                                --no_fused_layers) instead of fused_layers.py's, which keep less for backward
  ours-mmap                     ours-learnable with blocks >= 1 MB in their own memory mappings instead of glibc's
                                heap (train.py --mmap_threshold_mb 1): less peak RSS, slower
  seed                          the seed's literal design, `seed_loss` below: a no-grad prompt forward
                                for PPL and h, then separate chosen / rejected forwards with full logits
  trl                           trl.DPOTrainer (sigmoid loss), timed per step by a callback in train()
  trl-default                   trl.DPOTrainer with DPOConfig's own defaults on this machine (bf16 autocast and
                                activation checkpointing in TRL 1.16): what its users run
  NAME+cache                    reference log-probs computed before timing, no reference model in memory

Precision (--precision fp32,bf16): every config but trl-default runs in each listed precision, named
NAME@fp32 / NAME@bf16. bf16 is autocast with fp32 master weights on both sides (train.py --precision
bf16; TRL's bf16=True); trl-default runs in the precision its defaults choose.

FLOPs per step (model FLOPs, attention scores ignored, N = all parameters, tied embedding once):
  6 N x policy tokens + 2 N x reference tokens (0 with a cache) + 2 N x prompt tokens (seed only),
where tokens are the real (non-pad) tokens the config runs through the model: with a shared prompt
each prompt counts once, otherwise twice; the % is of a 2048^3 matmul in the precision the step
runs in, measured in the same run (the table records the CPU model and the bf16 / fp32 ratio:
bf16 kernels differ by CPU, so ratios between machines do not compare). "real tokens/s" counts every config's tokens the conventional way (each prompt twice), so it
compares configs on the same work.
On CPU peak memory is the process's peak RSS (ru_maxrss), which includes imports and the model.

--device cuda --arch DIR: the architecture in DIR/config.json with random weights (no download), the
real DeepSeek-R1-Distill-Qwen tokenizer's ids, random token pairs of --max_length tokens (a quarter
prompt), bf16 autocast, sdpa attention; peak memory is torch.cuda.max_memory_allocated and the % is
MFU against --peak_tflops (model FLOPs: 6 N per policy token, 4 N with LoRA, + 2 N per reference
token). Configs: ours-learnable, ours-learnable+cache, ours-lora (LoRA r 16 on every linear layer, the
reference = adapters off) and, when trl and datasets import, trl-default and trl-default+cache.
gpu_bench.sh runs it in one call of the device tool; on CPU with a tiny config it checks the script.

--memory_sweep: one step of ours-learnable, seed and trl (each with a reference model), 2 pairs of
random token ids (a quarter prompt) per length, on a random 2-layer Qwen2 with hidden size 64 and
the real 151,936-token vocabulary (model_loader.build_tiny_qwen2): nearly all of it is the LM head,
so it shows what full-vocabulary logits cost in memory, not the speed of a real model.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from batching import collate
from beta_head import BetaHead
from cpu_memory import set_mmap_threshold
from data import load_rows, normalize_row
from logprobs import last_token_hidden, masked_ppl
from losses import dpo_loss
from tokenization import build_examples
from model_loader import build_model, build_tiny_qwen2, frozen_copy, load_policy, load_tokenizer, peak_memory_gb

ROOT = os.path.dirname(os.path.abspath(__file__))
HH_PAIRS = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf-harmless-base", "pairs-2000.jsonl.gz")
DEEPSEEK_TOKENIZER = os.path.join(ROOT, "..", "shared", "tokenizers", "deepseek-r1-distill-qwen")
KINDS = ("ours-fixed", "ours-learnable", "ours-unshared", "ours-unfused", "ours-mmap", "ours-lora", "seed", "trl", "trl-default")
CONFIGS = [f"{c}{s}" for s in ("", "+cache") for c in KINDS]
DEFAULT_CONFIGS = [f"{c}{s}" for s in ("", "+cache") for c in ("ours-fixed", "ours-learnable", "trl", "trl-default")] + ["ours-unfused", "ours-mmap"]
SWEEP_CONFIGS = ["ours-learnable", "seed", "trl"]
BETA, LR = 0.1, 1e-6


def get_args(argv=None) -> argparse.Namespace:
    fmt = type("Fmt", (argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter), {})
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name or directory (as train.py's --model_name_or_path)")
    p.add_argument("--data", default=HH_PAIRS if os.path.exists(HH_PAIRS) else "demo",
                   help="pairs file (default: ../shared HH-RLHF pairs when present, else the demo set); its first pairs, in file order")
    p.add_argument("--batch_size", type=int, default=4, help="pairs per step")
    p.add_argument("--max_length", type=int, default=256, help="max tokens of prompt + response (tokenization.build_examples)")
    p.add_argument("--max_prompt_length", type=int, default=192, help="prompts keep their last this-many tokens")
    p.add_argument("--warmup_steps", type=int, default=2, help="untimed steps at the start of every process")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (step i always gets batch i)")
    p.add_argument("--rounds", type=int, default=2, help="passes over the configs, order rotated; medians pool all rounds")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--precision", default="fp32,bf16",
                   help="fp32, bf16 (autocast, fp32 master weights) or both (comma list): every config but trl-default "
                        "runs in each")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()),
                   help="torch threads in every process (default: OMP_NUM_THREADS when set, else all cores)")
    p.add_argument("--seed", type=int, default=0, help="torch seed in every process (BetaHead init)")
    p.add_argument("--json", default="bench_results.json", help="write all results here")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the steps run")
    p.add_argument("--arch", default=None,
                   help="a directory with a config.json: that architecture with random weights and random token pairs of "
                        "--max_length tokens, the real DeepSeek tokenizer (for GPU runs of the 1.5B target without weights)")
    p.add_argument("--tokenizer", default=DEEPSEEK_TOKENIZER, help="--arch: the tokenizer whose ids (pad, eos) the pairs use")
    p.add_argument("--peak_tflops", type=float, default=790.0,
                   help="--device cuda: the GPU's dense bf16 peak for MFU (H200: ~790 measured; a matmul is also measured)")
    p.add_argument("--memory_sweep", action="store_true",
                   help="instead: peak RSS of one step at --sweep_lengths, batch 2 pairs, tiny Qwen2 with the real vocabulary")
    p.add_argument("--sweep_lengths", default="256,512,1024,2048", help="sequence lengths of --memory_sweep")
    p.add_argument("--profile", action="store_true",
                   help="instead: where one ours-learnable step spends its time (torch.profiler, after the warm-up), in the "
                        "last --precision: the matmuls' share of the step and their own GFLOP/s against that matmul peak")
    p.add_argument("--no_profile", action="store_true",
                   help="skip the profiled ours-learnable step that follows the table in each precision")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)      # internal: run one config (NAME@PRECISION)
    p.add_argument("--_model_dir", default=None, help=argparse.SUPPRESS)   # internal: converted weights
    p.add_argument("--_sweep_len", type=int, default=0, help=argparse.SUPPRESS)  # internal: synthetic pairs
    p.add_argument("--_profile", action="store_true", help=argparse.SUPPRESS)   # internal: profile a step
    args = p.parse_args(argv)
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        p.error(f"unknown --configs {sorted(unknown)}; choose from {CONFIGS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.arch and not os.path.exists(os.path.join(args.arch, "config.json")):
        p.error(f"--arch {args.arch}: no config.json there")
    if not set(args.precision.split(",")) <= {"fp32", "bf16"}:
        p.error(f"--precision takes fp32, bf16 or fp32,bf16; got {args.precision!r}")
    return args


# -----------------------------------------------------------------------------
# the seed's literal design, for comparison


def seed_logps(model, input_ids, attention_mask, loss_mask) -> torch.Tensor:
    """Sequence log-probs (N,) the plain way: full (N, T, V) logits, log_softmax in fp32."""
    T = int(attention_mask.sum(-1).max())  # this half padded on its own
    ids, loss_mask = input_ids[:, :T], loss_mask[:, 1:T]
    logps = model(input_ids=ids, attention_mask=attention_mask[:, :T]).logits.float().log_softmax(-1)
    return (logps[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * loss_mask).sum(-1)


def seed_reference_logps(reference, batch) -> torch.Tensor:
    B = batch["input_ids"].shape[0] // 2
    with torch.no_grad():
        return torch.cat([seed_logps(reference, *(batch[k][half] for k in ("input_ids", "attention_mask", "loss_mask")))
                          for half in (slice(None, B), slice(B, None))])


def seed_loss(policy, reference, head: BetaHead, batch: dict) -> torch.Tensor:
    """The seed's step: compute_ppl as a separate no-grad forward over the prompt (PPL and last
    prompt hidden state), separate policy forwards for chosen and rejected, separate reference
    forwards for chosen and rejected (or the batch's cached reference_logps), the DPO loss."""
    ids, mask, loss_mask, prompt_mask = (batch[k] for k in ("input_ids", "attention_mask", "loss_mask", "prompt_mask"))
    B = ids.shape[0] // 2
    with torch.no_grad():
        P = int(prompt_mask[:B].sum(-1).max())
        out = policy(input_ids=ids[:B, :P], attention_mask=prompt_mask[:B, :P], output_hidden_states=True)
        tok = out.logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:B, 1:P, None]).squeeze(-1)
        ppl = masked_ppl(tok, prompt_mask[:B, :P])
        h = last_token_hidden(out.hidden_states[-1], prompt_mask[:B, :P])
    beta = head(h, ppl)
    chosen = seed_logps(policy, ids[:B], mask[:B], loss_mask[:B])
    rejected = seed_logps(policy, ids[B:], mask[B:], loss_mask[B:])
    ref = batch["reference_logps"] if "reference_logps" in batch else seed_reference_logps(reference, batch)
    return dpo_loss(chosen, rejected, ref[:B], ref[B:], beta)[0].mean()


# -----------------------------------------------------------------------------
# one config, in its own process


def bench_pairs(args, tok) -> tuple[list[dict], list[dict]]:
    """(examples, text rows): the first (warmup + steps) x batch_size pairs, or synthetic ones."""
    n = (args.warmup_steps + args.steps) * args.batch_size
    length = args._sweep_len or (args.max_length if args.arch else 0)
    if length:  # random ids: a quarter prompt, the rest response, both ending where max length ends
        g = torch.Generator().manual_seed(args.seed)
        P, R = length // 4, length - length // 4 - 1
        rand = lambda k: torch.randint(1000, 100000, (k,), generator=g).tolist()  # noqa: E731
        examples = [dict(prompt_ids=rand(P), chosen_ids=rand(R) + [tok.eos_token_id],
                         rejected_ids=rand(R) + [tok.eos_token_id]) for _ in range(n)]
        return examples, [dict(prompt="Hi.", chosen="Hello!", rejected="Go away.")] * n
    rows = load_rows(args.data)[:n]
    examples, report = build_examples(rows, tok, args.max_length, args.max_prompt_length)
    if len(examples) < n or report["skipped"]:
        sys.exit(f"error: need {n} usable pairs from the first {n} rows of {args.data}; got {report['kept']}")
    return examples, rows


def setup_trl(args, policy, tok, examples, rows, cache: bool, tmp: str, n_steps: int, precision: str | None):
    """A DPOTrainer on the same weights and token ids; returns (run, per-step times list). precision
    None: DPOConfig's own defaults for precision and activation checkpointing (trl-default)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    # transformers 5.23 renamed gradient_checkpointing to activation_checkpointing (a GPU image may hold an older one)
    ckpt = next(k for k in ("activation_checkpointing", "gradient_checkpointing") if k in DPOConfig.__dataclass_fields__)
    ours = {} if precision is None else dict(bf16=precision == "bf16", fp16=False, **{ckpt: False})
    config = DPOConfig(
        output_dir=tmp, report_to=[], use_cpu=args.device == "cpu", **ours, loss_type=["sigmoid"], beta=BETA, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused",  # TRL's default, = train.py's AdamW(fused=True)
        max_length=args.max_length, precompute_ref_log_probs=cache, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, max_steps=n_steps, train_sampling_strategy="sequential",
        dataloader_num_workers=0, disable_dropout=True, seed=args.seed, save_strategy="no",
        logging_steps=10**6, disable_tqdm=True)
    # TRL 1.16 cannot take pre-tokenised rows: it tokenises these text pairs itself (same chat template) ...
    text = []
    for row in rows[:args.batch_size] if cache else rows:  # +cache: one batch, to keep its own precompute pass short
        prompt, c, r = normalize_row(row)
        prompt = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text.append(dict(prompt=prompt, chosen=[{"role": "assistant", "content": c}],
                         rejected=[{"role": "assistant", "content": r}]))
    trainer = DPOTrainer(model=policy, ref_model=None if cache else frozen_copy(policy), args=config,
                         train_dataset=Dataset.from_list(text), processing_class=tok)
    own = trainer.train_dataset  # its own tokenisation, filter and truncation (keep_start), for the record
    own_tokens = dict(pairs=len(own), real_tokens=int(trainer.data_collator(list(own))["attention_mask"].sum()))
    # ... then trains on our token ids, as tests/test_trl_parity.py does, so both sides see the same tokens
    trainer.train_dataset = Dataset.from_list(examples)
    if cache:  # TRL's own precompute pass, before timing
        trainer.train_dataset = trainer._precompute_ref_logps(trainer.train_dataset, "train", args.batch_size)

    times = []

    class StepTimer(TrainerCallback):  # on_step_begin .. on_step_end = forward, backward, clip, AdamW, zero_grad
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    trainer.add_callback(StepTimer())
    own_tokens.update(bf16=config.bf16, activation_checkpointing=getattr(config, ckpt))
    return trainer.train, times, own_tokens


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    name, precision = args._worker.split("@")
    kind, cache = name.removesuffix("+cache"), name.endswith("+cache")
    device = torch.device(args.device)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731
    tok = load_tokenizer(args.tokenizer if args.arch else args._model_dir)
    examples, rows = bench_pairs(args, tok)
    batches = [{k: v.to(device) for k, v in collate(examples[i:i + args.batch_size], tok.pad_token_id).items()}
               for i in range(0, len(examples), args.batch_size)]
    policy = random_model(args.arch, device) if args.arch else load_policy(args._model_dir).to(device)
    result = dict(config=args._worker, precision=precision, pairs=len(examples), real_tokens=[int(b["attention_mask"].sum()) for b in batches],
                  prompt_tokens=[int(b["prompt_mask"][:args.batch_size].sum()) for b in batches])

    if kind.startswith("trl"):
        with tempfile.TemporaryDirectory() as tmp:
            train, times, result["trl_own_tokenisation"] = setup_trl(
                args, policy, tok, examples, rows, cache, tmp, len(batches), None if kind == "trl-default" else precision)
            result["precision"] = "bf16" if result["trl_own_tokenisation"]["bf16"] else "fp32"  # what TRL ran in
            result["rss_before_steps_gb"] = current_rss_gb()
            train()
    else:
        # as train.py builds it (the reference's Linear layers in bf16 under bf16; LoRA rank 16 for
        # ours-lora, the reference then the policy with adapters off); w is not calibrated to beta0:
        # the value of beta does not change the cost of a step
        cfg = dict(beta_mode="fixed" if kind == "ours-fixed" else "learnable", beta=BETA, beta_min=0.0,
                   beta_max=float("inf"), lora_r=16 if kind == "ours-lora" else 0, lora_alpha=16.0,
                   lora_target_modules="all-linear", nn_structure="linear", epsilon=0.1, mlp_hidden_size=256,
                   ppl_transform="ppl", no_prompt_sharing=kind == "ours-unshared", no_fused_layers=kind == "ours-unfused")
        if device.type == "cpu" and kind == "ours-mmap":
            set_mmap_threshold(1.0)  # train.py --mmap_threshold_mb 1
        model = build_model(cfg, device, torch.bfloat16 if precision == "bf16" else None, base=policy)
        policy, reference, head = model.policy_model, model.reference_model, model.beta_head
        cuda = device.type == "cuda"
        if cache:  # reference log-probs once, before timing; then no reference model in memory
            for b in batches:
                with autocast():
                    b["reference_logps"] = (seed_reference_logps(reference, b) if kind == "seed" else model.reference_logps(
                        b["input_ids"], b["attention_mask"], b["loss_mask"],
                        model.pair_layout(b["input_ids"], b["attention_mask"], b["prompt_mask"], b["pack_plan"],
                                          b["pack_unpack"])))
            model.drop_reference()
            reference = None
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0, fused=True)  # as train.py
        result["rss_before_steps_gb"] = current_rss_gb()

        def step(b):
            with autocast():  # as accelerate's bf16 mode wraps train.py's forward
                loss = seed_loss(policy, reference, head, b) if kind == "seed" else model(**b)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if args._profile:  # the warm-up steps, then one profiled step
            for b in batches[:args.warmup_steps]:
                step(b)
            return dict(result, **profile_step(step, batches[args.warmup_steps]))
        times = []
        for b in batches:
            t0 = time.perf_counter()
            step(b)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)

    assert len(times) == len(batches), f"{name}: timed {len(times)} of {len(batches)} steps"
    w = args.warmup_steps
    result.update(all_real_tokens=result["real_tokens"], real_tokens=result["real_tokens"][w:],
                  prompt_tokens=result["prompt_tokens"][w:], warmup_times=times[:w], step_times=times[w:],
                  **{"peak_cuda_gb": None, **peak_memory_gb(device)},
                  n_params=sum(p.numel() for n, p in policy.named_parameters() if "lora_" not in n))
    return result


def random_model(arch: str, device: torch.device):
    """The architecture in arch/config.json with random fp32 weights (the master weights), built on
    the device, sdpa attention, dropout off; seeded by the worker."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(arch, attn_implementation="sdpa")
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    return model.train()


def profile_step(step, batch) -> dict:
    """One step under torch.profiler (with FLOP counting): the step's wall time, the self time of
    every op, and the matmuls' (mm, addmm, bmm) FLOPs."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        t0 = time.perf_counter()
        step(batch)
        wall = time.perf_counter() - t0
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    mm = [e for e in ops if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
    return dict(step_s=wall, ops=[(e.key, e.self_cpu_time_total / 1e6, e.count) for e in ops[:12]],
                all_ops=[(e.key, e.self_cpu_time_total / 1e6, e.count) for e in ops],
                matmul_s=sum(e.self_cpu_time_total for e in mm) / 1e6, matmul_flops=sum(e.flops for e in mm))


def current_rss_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) * 1024 / 1e9  # kB = KiB


# -----------------------------------------------------------------------------
# the parent: prepare once, run the configs in rounds, report


def run_config(args, name: str, model_dir: str, extra: list[str] = ()) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--_worker", name, "--_model_dir", model_dir]
    for flag in ("data", "batch_size", "max_length", "max_prompt_length", "warmup_steps", "steps", "threads", "seed",
                 "device"):
        argv += [f"--{flag}", str(getattr(args, flag))]
    if args.arch:
        argv += ["--arch", args.arch, "--tokenizer", args.tokenizer]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1",
               TRANSFORMERS_VERBOSITY="error", HF_DATASETS_DISABLE_PROGRESS_BARS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(argv + list(extra), stdout=subprocess.PIPE, env=env, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"error: config {name} failed (exit {proc.returncode}); run it alone with --configs {name}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def matmul_gflops(threads: int, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 10,
                  device: str = "cpu") -> float:
    """Median GFLOP/s of an n x n @ n x n matmul in dtype: this machine's practical peak."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def peaks(threads: int, device: str = "cpu") -> dict[str, float]:
    """The matmul peaks in fp32 and bf16. On CUDA the parent process measures them while each config
    trains in a child: the caching allocator's ~1 GB of freed 8192^2 matrices is handed back to the
    driver afterwards, so the child's memory (and its peak test) is the card's less the CUDA context."""
    n = 8192 if device == "cuda" else 2048
    out = {"fp32": matmul_gflops(threads, n=n, device=device), "bf16": matmul_gflops(threads, torch.bfloat16, n=n, device=device)}
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown CPU")


def prepare_model(args, tmp: str) -> str:
    """The weights and tokenizer as a plain fp32 safetensors directory, so that every worker loads
    the same weights quickly and without a de-quantisation peak in its RSS (--arch: nothing to do,
    every worker builds the random model itself)."""
    if args.arch:
        return args.arch
    if args.memory_sweep:
        if not os.path.isdir(DEEPSEEK_TOKENIZER):
            sys.exit(f"error: --memory_sweep needs the DeepSeek tokenizer at {DEEPSEEK_TOKENIZER}")
        return build_tiny_qwen2(tmp, DEEPSEEK_TOKENIZER, hidden_size=64)
    load_policy(args.model).save_pretrained(tmp, safe_serialization=True)
    load_tokenizer(args.model).save_pretrained(tmp)
    return tmp


def summarize(name: str, runs: list[dict], peak: dict[str, float]) -> dict:
    times = [t for r in runs for t in r["step_times"]]
    tokens = [n for r in runs for n in r["real_tokens"]]
    prompts = [n for r in runs for n in r["prompt_tokens"]]
    N, cache = runs[0]["n_params"], "+cache" in name
    shared = name.startswith(("ours-fixed", "ours-learnable", "ours-unfused", "ours-mmap"))  # each prompt runs once
    computed = [n - p if shared else n for n, p in zip(tokens, prompts)]
    flops = [N * (6 * c + (0 if cache else 2 * c) + (2 * p if name.startswith("seed") else 0))
             for c, p in zip(computed, prompts)]
    gflops = statistics.median(f / t for f, t in zip(flops, times)) / 1e9
    own, precision = runs[0].get("trl_own_tokenisation") or {}, runs[0]["precision"]
    return dict(config=name, precision=precision, checkpointing=bool(own.get("activation_checkpointing")),
                median_step_s=statistics.median(times), steps_measured=len(times),
                pairs_per_s=runs[0]["batch_size"] / statistics.median(times),
                real_tokens_per_s=statistics.median(n / t for n, t in zip(tokens, times)),
                real_tokens_per_step=statistics.mean(tokens), computed_tokens_per_step=statistics.mean(computed),
                peak_rss_gb=max(r["peak_rss_gb"] for r in runs),
                rss_before_steps_gb=max(r["rss_before_steps_gb"] for r in runs), gflops=gflops,
                pct_of_peak=100 * gflops / peak[precision])


def paired(runs: dict, a: str, b: str) -> float | None:
    """Median over measured steps of b's step time / a's, on the same batch in the same round
    (> 1: a is faster). Pairing removes the spread between batches and slow drifts of the machine."""
    if a not in runs or b not in runs:
        return None
    ta, tb = ([t for r in runs[n] for t in r["step_times"]] for n in (a, b))
    return statistics.median(y / x for x, y in zip(ta, tb))


def config_names(args) -> list[str]:
    """NAME@PRECISION for every config and precision; trl-default once, in its own precision."""
    precisions = args.precision.split(",")
    return [f"{c}@{p}" for p in precisions for c in args.configs.split(",") if not c.startswith("trl-default")] + \
        [f"{c}@default" for c in args.configs.split(",") if c.startswith("trl-default")]


def main_bench(args, model_dir: str) -> dict:
    names = config_names(args)
    cpu, peak_before = cpu_model(), peaks(args.threads)
    print(f"{cpu}: 2048^3 matmul on {args.threads} threads: fp32 {peak_before['fp32']:.1f} GFLOP/s, "
          f"bf16 {peak_before['bf16']:.1f} GFLOP/s", flush=True)
    runs = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            speed, t0 = matmul_gflops(args.threads), time.time()  # the machine's speed just before: flags noisy periods
            res = run_config(args, name, model_dir)
            res.update(batch_size=args.batch_size, matmul_gflops_before=speed)
            runs[name].append(res)
            print(f"round {r + 1}/{args.rounds} {name:27s} median {statistics.median(res['step_times']):6.2f} s/step "
                  f"(warm-up {', '.join(f'{t:.1f}' for t in res['warmup_times'])} s), peak RSS {res['peak_rss_gb']:.2f} GB, "
                  f"{time.time() - t0:.0f} s wall; fp32 matmul before it {speed:.0f} GFLOP/s", flush=True)
    peak_after = peaks(args.threads)
    peak = {"fp32": max([peak_before["fp32"], peak_after["fp32"]] + [r["matmul_gflops_before"] for rs in runs.values() for r in rs]),
            "bf16": max(peak_before["bf16"], peak_after["bf16"])}
    rows = [summarize(n, runs[n], peak) for n in names]
    rss = {row["config"]: row["peak_rss_gb"] for row in rows}

    def versus(row, trl_name):
        suffix = "+cache" if "+cache" in row["config"] else ""
        other = f"trl{suffix}@{trl_name}" if trl_name != "default" else f"trl-default{suffix}@default"
        return paired(runs, row["config"], other), (row["peak_rss_gb"] / rss[other] if other in rss else None)

    for row in rows:
        row["vs_trl_same_precision"], row["rss_vs_trl_same_precision"] = versus(row, row["config"].split("@")[1])
        row["vs_trl_default"], row["rss_vs_trl_default"] = versus(row, "default")
    fmt = lambda x, f: "–" if x is None else format(x, f)  # noqa: E731
    ratio = peak["bf16"] / peak["fp32"]
    print(f"\n{time.strftime('%Y-%m-%d')}, {cpu}, {args.threads} threads, torch {torch.__version__}: matmul peak fp32 "
          f"{peak['fp32']:.1f} GFLOP/s, bf16 {peak['bf16']:.1f} GFLOP/s (bf16 / fp32 = {ratio:.2f}). {args.batch_size} pairs "
          f"x <= {args.max_length} tokens, {rows[0]['steps_measured']} measured steps per config. pairs/s and tokens/s "
          "are medians over steps; 'vs TRL' is the median over steps of TRL's step time / this config's on the same "
          "batch and round (same cache setting); % of peak is against the matmul peak of the step's precision\n")
    print("| config | precision | pairs/s | real tokens/s | peak RSS GB | speed vs TRL same precision | RSS vs TRL same "
          "precision | speed vs TRL default | RSS vs TRL default | GFLOP/s | % of matmul peak |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        prec = row["precision"] + (" + checkpointing" if row["checkpointing"] else "")
        print(f"| {row['config'].split('@')[0]} | {prec} | {row['pairs_per_s']:.3f} | {row['real_tokens_per_s']:.0f} | "
              f"{row['peak_rss_gb']:.2f} | {fmt(row['vs_trl_same_precision'], '.2f')} | "
              f"{fmt(row['rss_vs_trl_same_precision'], '.2f')} | {fmt(row['vs_trl_default'], '.2f')} | "
              f"{fmt(row['rss_vs_trl_default'], '.2f')} | {row['gflops']:.1f} | {row['pct_of_peak']:.1f} |")
    print()
    for suffix in ("", "+cache"):  # the same paired medians, for the other comparisons of the issue
        for p in args.precision.split(","):
            for a, b in (("ours-fixed", "ours-learnable"), ("ours-learnable", "seed"), ("ours-learnable", "ours-unshared"),
                         ("ours-unshared", "seed"), ("ours-learnable", "ours-unfused"), ("ours-learnable", "ours-mmap")):
                r = paired(runs, f"{a}{suffix}@{p}", f"{b}{suffix}@{p}")
                if r is not None:
                    print(f"step time {b}{suffix}@{p} / {a}{suffix}@{p}: {r:.3f}; peak RSS "
                          f"{rss[f'{b}{suffix}@{p}']:.2f} / {rss[f'{a}{suffix}@{p}']:.2f} GB")
        for c in ("ours-fixed", "ours-learnable", "trl"):
            r = paired(runs, f"{c}{suffix}@bf16", f"{c}{suffix}@fp32")
            if r is not None:
                print(f"step time {c}{suffix}@fp32 / {c}{suffix}@bf16: {r:.3f}")
    trl_runs = [rs[0] for n, rs in runs.items() if n.startswith("trl")]
    if trl_runs:
        r = trl_runs[0]
        print(f"real tokens per measured step: {rows[0]['real_tokens_per_step']:.0f}, the same token ids for every config. "
              f"For the record, TRL's own tokenisation of the {r['pairs']} pairs: {r['trl_own_tokenisation']['real_tokens']} "
              f"real tokens in {r['trl_own_tokenisation']['pairs']} pairs kept; ours: {sum(r['all_real_tokens'])} in {r['pairs']}")
    r0 = runs[names[0]][0]
    print("FLOPs/step = 6 N x policy tokens + 2 N x reference tokens (0 with +cache) + 2 N x prompt tokens (seed), "
          f"N = {r0['n_params'] / 1e6:.1f}M; tokens are those run through the model: "
          f"{statistics.mean(n - p for n, p in zip(r0['real_tokens'], r0['prompt_tokens'])):.0f} per step when each prompt "
          "runs once (ours-fixed, ours-learnable), "
          f"{rows[0]['real_tokens_per_step']:.0f} when it runs twice")
    profiles = {}
    if not args.no_profile and any(n.startswith("ours-learnable@") for n in names):
        print("\nWhere the time of one ours-learnable step goes, in each precision (torch.profiler, self time):\n")
        profiles = {p: profile_report(args, model_dir, p, peak[p]) for p in args.precision.split(",")}
    return dict(cpu=cpu, matmul_gflops=dict(start=peak_before, end=peak_after, peak=peak, bf16_over_fp32=ratio),
                summary=rows, runs=runs, profiles=profiles)


ARCH_CONFIGS = ["ours-learnable@bf16", "ours-learnable+cache@bf16", "ours-lora@bf16", "trl-default@default",
                "trl-default+cache@default"]


def main_arch(args, model_dir: str) -> dict:
    """--arch: one pass over ARCH_CONFIGS (TRL's only when trl and datasets import): step time,
    tokens/s, MFU and peak memory of each. Meant for --device cuda; on CPU (with a tiny config) it
    checks the script before device time is spent on it."""
    try:
        import datasets, trl  # noqa: F401  (importable, not only present: datasets needs pyarrow >= 24)
        has_trl = True
    except ImportError as e:
        print(f"TRL rows skipped: {e}", flush=True)
        has_trl = False
    names = [n for n in ARCH_CONFIGS if has_trl or not n.startswith("trl")]
    cuda = args.device == "cuda"
    device_name, peak = (torch.cuda.get_device_name() if cuda else cpu_model()), peaks(args.threads, args.device)
    print(f"{device_name}: {8192 if cuda else 2048}^3 matmul: bf16 {peak['bf16'] / 1e3:.0f} TFLOP/s, fp32 {peak['fp32'] / 1e3:.0f} TFLOP/s; "
          f"MFU against {args.peak_tflops:.0f} TFLOP/s", flush=True)
    rows = []
    for name in names:
        t0 = time.time()
        try:  # one config failing (out of memory, a library's version) leaves the others' rows
            r = run_config(args, name, model_dir)
        except SystemExit as e:
            print(e, flush=True)
            continue
        N, tokens, step = r["n_params"], statistics.mean(r["real_tokens"]), statistics.median(r["step_times"])
        shared = name.startswith("ours")
        computed = tokens - statistics.mean(r["prompt_tokens"]) if shared else tokens
        policy_flops = (4 if "lora" in name else 6) * N * computed  # LoRA: no weight gradients of the base
        flops = policy_flops + (0 if "+cache" in name else 2 * N * computed)
        memory = r["peak_cuda_gb"] if cuda else r["peak_rss_gb"]
        rows.append(dict(config=name, step_s=step, tokens_per_s=tokens / step, mfu=flops / step / (args.peak_tflops * 1e12),
                         peak_memory_gb=memory, runs=r))
        print(f"{name:28s} {step:6.3f} s/step, {tokens / step:8.0f} real tokens/s, MFU {100 * rows[-1]['mfu']:.1f}%, "
              f"peak {'CUDA memory' if cuda else 'RSS'} {memory:.1f} GB ({time.time() - t0:.0f} s wall)", flush=True)
    import transformers
    versions = dict(torch=torch.__version__, transformers=transformers.__version__, **({"trl": trl.__version__} if has_trl else {}))
    print(f"\n{time.strftime('%Y-%m-%d')}, {device_name}, {', '.join(f'{k} {v}' for k, v in versions.items())}: {args.arch} with random weights, "
          f"{args.batch_size} pairs x {args.max_length} tokens, bf16 autocast, {args.steps} measured steps\n")
    print(f"| config | s/step | real tokens/s | MFU vs {args.peak_tflops:.0f} TFLOP/s | peak {'CUDA memory' if cuda else 'RSS'} GB |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['config'].split('@')[0]} | {row['step_s']:.3f} | {row['tokens_per_s']:.0f} | "
              f"{100 * row['mfu']:.1f}% | {row['peak_memory_gb']:.1f} |")
    return dict(device=device_name, versions=versions, matmul_gflops=peak, summary=[{k: v for k, v in r.items() if k != "runs"} for r in rows],
                runs={r["config"]: r["runs"] for r in rows})


OP_KINDS = [("matmul", ("aten::mm", "aten::addmm", "aten::bmm")), ("attention", ("scaled_dot_product",)),
            ("casts and copies", ("aten::copy_", "aten::_to_copy")), ("AdamW", ("adam",)),
            ("log-softmax over the vocabulary", ("softmax", "aten::exp", "aten::sub"))]


def op_kind(key: str) -> str:
    return next((kind for kind, names in OP_KINDS if any(n in key.lower() for n in names)), "elementwise and other")


def profile_report(args, model_dir: str, precision: str, peak: float) -> dict:
    """One profiled ours-learnable step in `precision`: its ops by self time, grouped by kind, and
    the matmuls' own rate against the matmul peak. Printed as two tables; returns the worker's result."""
    res = run_config(args, f"ours-learnable@{precision}", model_dir, ["--_profile"])
    mm_rate = res["matmul_flops"] / res["matmul_s"] / 1e9
    print(f"{cpu_model()}: ours-learnable in {precision}, one step (batch {args.warmup_steps + 1}, "
          f"{res['real_tokens'][args.warmup_steps]} real tokens) under torch.profiler: {res['step_s']:.2f} s wall; "
          f"{precision} matmul peak {peak:.1f} GFLOP/s\n")
    kinds = {}
    for key, t, n in res["all_ops"]:
        kinds[op_kind(key)] = kinds.get(op_kind(key), 0.0) + t
    res["by_kind"] = kinds
    print("| kind of op | self time s | share of step |")
    print("| --- | ---: | ---: |")
    for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {t:.3f} | {100 * t / res['step_s']:.1f}% |")
    print("\n| op | self time s | share of step | calls |")
    print("| --- | ---: | ---: | ---: |")
    for key, t, n in res["ops"]:
        print(f"| {key[:60]} | {t:.3f} | {100 * t / res['step_s']:.1f}% | {n} |")
    print(f"\nmatmuls (mm, addmm, bmm): {res['matmul_s']:.2f} s = {100 * res['matmul_s'] / res['step_s']:.1f}% of the step, "
          f"{res['matmul_flops'] / 1e9:.0f} GFLOP at {mm_rate:.1f} GFLOP/s = {100 * mm_rate / peak:.1f}% of the matmul peak\n")
    return res


def main_profile(args, model_dir: str) -> dict:
    precision = args.precision.split(",")[-1]
    peak = peaks(args.threads)[precision]
    return dict(cpu=cpu_model(), precision=precision, matmul_gflops=peak,
                profile=profile_report(args, model_dir, precision, peak))


def main_sweep(args, model_dir: str) -> dict:
    lengths = [int(x) for x in args.sweep_lengths.split(",")]
    args.batch_size, args.warmup_steps, args.steps = 2, 0, 1
    results = {}
    for L in lengths:
        args.max_length = L  # TRL's collator truncates at max_length
        for name in SWEEP_CONFIGS:
            res = run_config(args, f"{name}@fp32", model_dir, ["--_sweep_len", str(L)])
            results[f"{name}@{L}"] = res
            print(f"T={L} {name:16s} peak RSS {res['peak_rss_gb']:.2f} GB (before the step {res['rss_before_steps_gb']:.2f} GB), "
                  f"step {res['step_times'][0]:.1f} s", flush=True)
    print(f"\n{time.strftime('%Y-%m-%d')}, {cpu_model()}, fp32, {args.threads} threads, torch {torch.__version__}\n")
    print("| tokens per sequence | ours peak RSS GB | seed (full logits) GB | TRL GB | seed / ours | TRL / ours |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for L in lengths:
        o, s, t = (results[f"{n}@{L}"]["peak_rss_gb"] for n in SWEEP_CONFIGS)
        print(f"| {L} | {o:.2f} | {s:.2f} | {t:.2f} | {s / o:.2f} | {t / o:.2f} |")
    return dict(cpu=cpu_model(), sweep=results)


if __name__ == "__main__":
    args = get_args()
    if args._worker:
        print(json.dumps(worker(args)))
        sys.exit(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = prepare_model(args, tmp)
        main = (main_sweep if args.memory_sweep else main_profile if args.profile else
                main_arch if args.arch else main_bench)
        out = main(args, model_dir)
    with open(args.json, "w") as f:
        json.dump(dict(args=vars(args), **out), f, indent=1)
    print(f"wrote {args.json}")
