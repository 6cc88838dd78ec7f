"""Security: weights only as safetensors, state only through torch.load(weights_only=True),
remote code off unless asked (and then a warning naming the repo), no shell."""

import ast
import glob
import os

import pytest

import train
from model_loader import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [p for p in glob.glob(os.path.join(ROOT, "*.py"))]


def calls(name):
    for path in SOURCES:
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == name:
                yield os.path.basename(path), node


def test_every_torch_load_is_weights_only():
    found = list(calls("load"))
    torch_loads = [(f, n) for f, n in found if getattr(n.func, "value", None) is not None
                   and getattr(n.func.value, "id", None) == "torch"]
    assert torch_loads, "expected torch.load calls to check"
    for f, n in torch_loads:
        kw = {k.arg: k.value for k in n.keywords}
        assert "weights_only" in kw and kw["weights_only"].value is True, f"{f}:{n.lineno}"


def test_no_shell_and_no_pickle():
    for f, n in calls("run"):
        assert not any(k.arg == "shell" for k in n.keywords), f"{f}:{n.lineno}"
    for name in ("eval", "exec", "system", "popen"):  # builtins eval/exec, os.system, os.popen
        assert not [f for f, n in calls(name) if isinstance(n.func, ast.Name) or name in ("system", "popen")], name
    for path in SOURCES:
        assert "import pickle" not in open(path).read(), path


@pytest.mark.slow
def test_checkpoint_weights_are_safetensors(tiny_qwen2_dir, tmp_path):
    out = tmp_path / "run"
    train.main(["--model_name_or_path", tiny_qwen2_dir, "--dataset", "demo", "--output_dir", str(out), "--max_steps", "1",
                "--batch_size", "2", "--max_length", "64", "--max_prompt_length", "40", "--max_eval_examples", "2",
                "--beta_mode", "learnable", "--precision", "fp32"])
    files = os.listdir(out / "final")
    assert "model.safetensors" in files and "beta_head.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pkl", ".pickle", ".pth"))]
    assert not [f for f in files if f.endswith(".pt")]  # final/ holds no optimizer state (no trainer_state.pt)


def test_remote_code_is_opt_in_and_warns(deepseek_tokenizer_dir, capsys):
    assert train.get_args([]).trust_remote_code is False
    load_tokenizer(deepseek_tokenizer_dir)
    assert "trust_remote_code" not in capsys.readouterr().out
    load_tokenizer(deepseek_tokenizer_dir, trust_remote_code=True)
    out = capsys.readouterr().out
    assert "WARNING" in out and deepseek_tokenizer_dir in out
