"""What a user gets around a run: flags from a YAML file (the command line wins), trackers through
accelerate (TensorBoard, MLflow offline), and a final/ to deploy without optimizer state."""

import importlib.util
import json
import os

import pytest
import torch

import train
from data import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_config_file_and_command_line_precedence(tmp_path):
    cfg = write(tmp_path / "run.yaml", "beta_mode: learnable\nbatch_size: 3\npolicy_lr: 1e-5\n"
                                       "strict_data: true\nbeta_max: 2\n")
    args = train.get_args(["--config", cfg, "--batch_size", "2"])
    assert args.batch_size == 2  # the command line overrides the file
    assert args.beta_mode == "learnable" and args.strict_data is True
    assert args.policy_lr == 1e-5 and isinstance(args.policy_lr, float)  # YAML reads 1e-5 as a string
    assert args.beta_max == 2.0 and args.config == cfg
    assert train.get_args(["--config", cfg]).batch_size == 3
    # the checks run on the merged flags: a file value is checked like a command-line one
    bad = write(tmp_path / "bad.yaml", "beta_mode: fixed\nbeta_head_lr: 0.1\n")
    with pytest.raises(SystemExit):
        train.get_args(["--config", bad])


@pytest.mark.parametrize("text,message", [
    ("batch_sise: 4\nlr: 1\n", "unknown flags ['batch_sise', 'lr']"),
    ("batch_size: four\n", "batch_size must be int; got 'four'"),
    ("batch_size: 2.5\n", "batch_size must be int; got 2.5"),
    ("beta_mode: adaptive\n", "beta_mode must be one of"),
    ("strict_data: 1\n", "strict_data must be true or false"),
    ("- a list\n", "must hold flag: value pairs"),
    ("batch_size: [\n", "is not valid YAML"),
])
def test_bad_config_files_name_the_problem(tmp_path, capsys, text, message):
    cfg = write(tmp_path / "run.yaml", text)
    with pytest.raises(SystemExit):
        train.get_args(["--config", cfg])
    err = capsys.readouterr().err
    assert message in err and "error:" in err


def test_shipped_configs_parse():
    quick = train.get_args(["--config", os.path.join(ROOT, "configs", "quickstart.yaml")])
    assert quick.model_name_or_path == "smollm2-135m-instruct" and quick.beta_mode == "learnable"
    r1 = train.get_args(["--config", os.path.join(ROOT, "configs", "deepseek-r1-distill-qwen-1.5b.yaml")])
    assert r1.model_name_or_path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B" and r1.max_length == 1024


def test_unknown_or_missing_tracker(tmp_path):
    with pytest.raises(SystemExit):
        train.get_args(["--report_to", "tensorboard,neptune"])
    if importlib.util.find_spec("wandb") is None:  # a tracker whose package is absent: one line saying what to install
        from model_loader import make_accelerator
        with pytest.raises(DataError, match="pip install wandb"):
            make_accelerator("fp32", ["wandb"], str(tmp_path))


@pytest.mark.slow
def test_trackers_and_deployable_final(tiny_qwen2_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoModelForCausalLM
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow's local file store: offline
    out = tmp_path / "run"
    flags = ["--model_name_or_path", tiny_qwen2_dir, "--dataset", "demo", "--eval_split", "test",
             "--max_eval_examples", "4", "--output_dir", str(out), "--batch_size", "2", "--max_length", "64",
             "--max_prompt_length", "40", "--max_steps", "3", "--log_every_steps", "1", "--save_every_steps", "2",
             "--beta_mode", "learnable", "--precision", "fp32", "--report_to", "tensorboard,mlflow"]
    train.main(flags)
    logged = [json.loads(x) for x in open(out / "metrics.jsonl")]
    train_loss = {m["step"]: m["loss"] for m in logged if m["split"] == "train"}
    assert sorted(train_loss) == [1, 2, 3]

    # TensorBoard: the same scalars, and the beta histograms
    ea = EventAccumulator(str(out / "tb" / "learnable-beta-dpo"), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    tb = {e.step: e.value for e in ea.Scalars("train/loss")}
    assert tb.keys() == train_loss.keys() and all(tb[s] == pytest.approx(train_loss[s]) for s in tb)
    assert "train/beta_hist" in ea.Tags()["histograms"] and "eval/rewards/accuracies" in ea.Tags()["scalars"]

    # MLflow (offline file store): the same scalars per step
    import mlflow
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == pytest.approx(train_loss)

    # final/: a Hugging Face model with a model card and no optimizer state; no step checkpoints left
    final = out / "final"
    assert not (final / "trainer_state.pt").exists() and not (out / "checkpoints").exists()
    model = AutoModelForCausalLM.from_pretrained(str(final))
    assert isinstance(model, torch.nn.Module)
    card = (final / "README.md").read_text()  # a local base is named in the text, not as hub metadata
    assert "A preference-tuned version of `" in card and "library_name: transformers" in card
    # a finished run without checkpoints cannot be "continued": say so instead of training again
    with pytest.raises(DataError, match="has finished"):
        train.main([*flags, "--resume_from", "auto"])
