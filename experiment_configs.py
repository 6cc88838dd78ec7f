"""The experiments' configurations as data: train.py flags per experiment and per beta mode, and
the command line they make (flags)."""


# configurations are data: train.py flags as dicts (flag name -> value; True is a bare switch), turned
# into a command line by flags(). Every mode shares its experiment's flags and adds its own.
MODES = {
    "fixed": dict(beta_mode="fixed"),
    "learnable": dict(beta_mode="learnable"),
    "learnable_logppl": dict(beta_mode="learnable", ppl_transform="log"),  # the stabiliser, see report.md
    "beta_dpo": dict(beta_mode="beta_dpo"),
}
EXPERIMENTS = {
    "e1": dict(model_name_or_path="smollm2-135m-instruct", eval_fraction=0.1, split_seed=0, max_length=128,
               max_prompt_length=96, batch_size=4, gradient_accumulation_steps=2, max_steps=24,
               max_train_examples=192, max_eval_examples=100, policy_lr=1e-5, beta=0.1, warmup_ratio=0.1,
               log_every_steps=2, eval_every_steps=0, save_every_steps=12, save_total_limit=1, eval_batch_size=8,
               precompute_ref=True, precision="fp32"),
    # bf16 against fp32: does autocast train like fp32? 100 steps of 4 pairs, held-out eval every 20
    "bf16": dict(model_name_or_path="smollm2-135m-instruct", eval_fraction=0.1, split_seed=0, max_length=128,
                 max_prompt_length=96, batch_size=4, max_steps=100, max_train_examples=400, max_eval_examples=100,
                 policy_lr=3e-5, beta=0.1, warmup_ratio=0.1, log_every_steps=5, eval_every_steps=20,
                 save_every_steps=50, save_total_limit=1, eval_batch_size=8, precompute_ref=True),
}
# the bf16 experiment's modes: fixed and learnable, each in both precisions
PRECISION_MODES = {f"{m}@{p}": dict(MODES[m], precision=p) for m in ("fixed", "learnable") for p in ("fp32", "bf16")}
# does the step with fused_layers.py's MLPs and norms train like Hugging Face's? 50 steps of
# learnable beta, the loss of every step logged, in the precision --precision auto picks
EXPERIMENTS["fused"] = dict(EXPERIMENTS["bf16"], max_steps=50, log_every_steps=1, eval_every_steps=0, save_every_steps=25)
FUSED_MODES = {"fused": dict(MODES["learnable"]), "unfused": dict(MODES["learnable"], no_fused_layers=True)}


def flags(config: dict) -> list[str]:
    """train.py's command line for a configuration: --name value, True as a bare --name, False and
    None left out."""
    out = []
    for name, value in config.items():
        if value is True:
            out.append(f"--{name}")
        elif value is not False and value is not None:
            out += [f"--{name}", str(value)]
    return out
