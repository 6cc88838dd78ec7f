"""Parity with TRL: our fixed-beta DPO loss, rewards and log-probs equal TRL's `DPOTrainer` (sigmoid loss).

What is compared. One model, one batch, identical token ids on both sides:

* Model: the tiny random Qwen2 of conftest (the real DeepSeek-R1-Distill-Qwen tokenizer, 151,936-token
  vocabulary). The reference is `frozen_copy` of the initial policy; the policy is then perturbed with
  seeded Gaussian noise so that policy != reference and the rewards are not zero. The SAME two model
  objects are given to our `DynamicBetaDPOModel(beta_head=None, beta=0.1)` and to TRL's
  `DPOTrainer(model=policy, ref_model=reference)`.
* Data: 4 preference pairs tokenised once by OUR `data.tokenize_pair` (chat template, EOS-terminated
  responses). TRL gets those ids, not the strings: TRL 1.16's `_prepare_dataset` cannot take a
  pre-tokenised dataset (it runs `extract_prompt` on any row without a "prompt" column, then
  re-tokenises), so the trainer is built on the text pairs (its own tokenisation of them is not used),
  and the pre-tokenised rows ({prompt_ids, chosen_ids, rejected_ids}, the columns TRL's own tokeniser
  produces and its `DataCollatorForPreference` consumes) are set as `trainer.eval_dataset` afterwards.
  `trainer.evaluate()` then runs TRL's own path end to end: dataloader, `DataCollatorForPreference`,
  `compute_loss` with the fused LM head for policy and reference, and the metric logging.
* Checked, to rtol = atol = 1e-5 (float32, CPU):
  - TRL's collated batch equals ours (input_ids, attention_mask; completion_mask == our loss_mask);
  - loss: ours vs `evaluate()`'s eval_loss and vs `trainer.compute_loss` on that batch in train mode;
  - per-example sequence log-probs of policy and reference, chosen and rejected: ours vs TRL's
    `compute_ref_log_probs(model, batch)` (TRL's fused-LM-head scorer; given the policy it scores the
    policy), and the per-example rewards beta * (policy - reference) built from them;
  - TRL's logged batch means `rewards/chosen`, `rewards/rejected`, `rewards/margins`,
    `rewards/accuracies`, `logps/chosen`, `logps/rejected` vs our `summarize()` of our stats.
  The test also checks that it is not trivially true: rewards are not all ~0, the loss is not log 2,
  and both sides really scored the pairs (log-probs are those of a random 152k-vocabulary model).
"""

import math

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed: the TRL parity test needs `pip install trl`")

BETA = 0.1
TOL = dict(rtol=1e-5, atol=1e-5)
PAIRS = [
    dict(prompt="What is 2+2?", chosen="It is 4.", rejected="It is 5, obviously."),
    dict(prompt="Name a colour.", chosen="Blue.", rejected="A car is not a colour."),
    dict(prompt="Say hi politely.", chosen="Hello, nice to meet you!", rejected="No."),
    dict(prompt="Give me a tip for baking bread.", chosen="Let the dough rise somewhere warm.",
         rejected="Figure it out yourself."),
]


def _perturb_(model: torch.nn.Module, seed: int = 1234, scale: float = 0.02) -> None:
    """Add seeded N(0, scale^2) noise to every parameter, in place (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


@pytest.fixture(scope="module")
def parity(tiny_qwen2_dir, tmp_path_factory):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from beta_head import DynamicBetaDPOModel
    from losses import summarize
    from batching import collate
    from tokenization import tokenize_pair
    from model_loader import frozen_copy, load_policy, load_tokenizer

    tok = load_tokenizer(tiny_qwen2_dir)
    examples = [tokenize_pair(tok, p["prompt"], p["chosen"], p["rejected"], max_length=128,
                              max_prompt_length=96, use_chat_template=True)[0] for p in PAIRS]
    ours_batch = collate(examples, tok.pad_token_id)

    policy = load_policy(tiny_qwen2_dir)
    reference = frozen_copy(policy)
    _perturb_(policy)

    # --- ours (before TRL patches the models' forward with its fused LM head) -------------------------
    ours_model = DynamicBetaDPOModel(policy, beta_head=None, reference_model=reference, beta=BETA)
    with torch.no_grad():
        our_loss, stats = ours_model(**ours_batch)
    our_metrics = summarize(stats, BETA)

    # --- TRL ------------------------------------------------------------------------------------------
    args = DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl_dpo")), report_to=[], use_cpu=True,
        bf16=False, fp16=False,  # TRL's configs default bf16=True: force fp32 like ours
        activation_checkpointing=False,  # TRL sets gradient_checkpointing=True by default (a deprecated alias)
        beta=BETA, loss_type=["sigmoid"], label_smoothing=0.0, f_divergence_type="reverse_kl",
        ld_alpha=None, use_weighting=False, precompute_ref_log_probs=False, sync_ref_model=False,
        max_length=None,  # no truncation beyond tokenize_pair's (TRL's default is 1024, keep_start)
        padding_free=False, pad_to_multiple_of=None, use_liger_kernel=False, disable_dropout=True,
        per_device_train_batch_size=len(PAIRS), per_device_eval_batch_size=len(PAIRS),
        dataloader_num_workers=0, seed=0,
    )
    text_pairs = Dataset.from_list(PAIRS)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=text_pairs,
                         processing_class=tok)
    assert trainer.model is policy and trainer.ref_model is reference
    pretokenised = Dataset.from_list(examples)
    trainer.eval_dataset = pretokenised

    trl_batch = trainer.data_collator(examples)
    trl_eval = trainer.evaluate()  # eval mode, one batch of len(PAIRS) pairs

    policy.train()
    trl_train_loss = trainer.compute_loss(policy, trainer._prepare_inputs(dict(trl_batch)))
    with torch.no_grad():
        trl_policy_logps = torch.cat(trainer.compute_ref_log_probs(policy, trl_batch))
        trl_ref_logps = torch.cat(trainer.compute_ref_log_probs(reference, trl_batch))

    return dict(ours_batch=ours_batch, our_loss=our_loss, stats=stats, our_metrics=our_metrics,
                trl_batch=trl_batch, trl_eval=trl_eval, trl_train_loss=trl_train_loss.detach(),
                trl_policy_logps=trl_policy_logps, trl_ref_logps=trl_ref_logps, B=len(PAIRS))


def _close(a, b) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), **TOL)


def test_not_trivial(parity):
    s, B = parity["stats"], parity["B"]
    rewards = torch.cat([s["chosen_rewards"], s["rejected_rewards"]])
    assert rewards.abs().max() > 1e-2, f"rewards ~0: the policy was not perturbed ({rewards})"
    assert abs(parity["our_loss"].item() - math.log(2)) > 1e-3
    # a random model over 151,936 tokens: each response token costs ~log(151936) ~ 11.9 nats
    assert (s["policy_chosen_logps"] < -20).all() and (s["reference_rejected_logps"] < -20).all()
    assert len(s["losses"]) == B


def test_same_token_ids_and_masks(parity):
    ours, trl_batch = parity["ours_batch"], parity["trl_batch"]
    assert torch.equal(trl_batch["input_ids"], ours["input_ids"])
    assert torch.equal(trl_batch["attention_mask"], ours["attention_mask"])
    assert torch.equal(trl_batch["completion_mask"], ours["loss_mask"])


def test_loss_matches_trl(parity):
    ours = parity["our_loss"].item()
    assert _close(ours, parity["trl_eval"]["eval_loss"]), (ours, parity["trl_eval"]["eval_loss"])
    assert _close(ours, parity["trl_train_loss"].item()), (ours, parity["trl_train_loss"].item())


def test_per_example_logps_and_rewards_match_trl(parity):
    s, B = parity["stats"], parity["B"]
    pol, ref = parity["trl_policy_logps"], parity["trl_ref_logps"]
    ours_pol = torch.cat([s["policy_chosen_logps"], s["policy_rejected_logps"]])
    ours_ref = torch.cat([s["reference_chosen_logps"], s["reference_rejected_logps"]])
    assert _close(ours_pol, pol), (ours_pol, pol)
    assert _close(ours_ref, ref), (ours_ref, ref)
    trl_rewards = BETA * (pol - ref)  # TRL's formula: chosen_rewards = self.beta * chosen_logratios
    assert _close(s["chosen_rewards"], trl_rewards[:B]), (s["chosen_rewards"], trl_rewards[:B])
    assert _close(s["rejected_rewards"], trl_rewards[B:]), (s["rejected_rewards"], trl_rewards[B:])


@pytest.mark.parametrize("name", ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                                  "logps/chosen", "logps/rejected"])
def test_logged_metrics_match_trl(parity, name):
    ours, theirs = parity["our_metrics"][name], parity["trl_eval"][f"eval_{name}"]
    assert _close(ours, theirs), (name, float(ours), theirs)
