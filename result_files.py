"""The experiments' files: result JSON written atomically and read back (a run's configuration,
its logged curves, its held-out splits, a study phase's results), figures saved, report.md's
blocks spliced, and data paths written the way the reports show them."""

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def shown_path(path: str) -> str:
    """How reports write a data path: a file under a folder named shared (the innermost one) as
    ../shared/..., wherever the checkout that ran it lived (result files record absolute paths), so
    that reports rebuild the same in any clone; other paths relative to the repo."""
    if not os.path.isabs(path):
        return path
    parts = path.split(os.sep)
    if "shared" in parts:
        return "/".join([".."] + parts[len(parts) - 1 - parts[::-1].index("shared"):])
    return os.path.relpath(path, HERE)


def write_text(path: str, text: str) -> None:
    """Write a file atomically: a reader never sees half of it."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj))


def config_of(result: dict) -> dict:
    """The train.py configuration a result was run with (results from before configurations were
    stored as dicts hold only the command line: parsed here)."""
    if "config" in result:
        return result["config"]
    config, argv = {}, result["flags"]
    for i, a in enumerate(argv):
        if a.startswith("--"):
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            config[a[2:]] = argv[i + 1] if has_value else True
    return config


def curve(result: dict, split: str) -> list[dict]:
    """A run's logged metrics of one split, one per step in step order. A resumed run logs the
    steps after its last checkpoint twice; the later line (from the completed attempt) wins."""
    by_step = {m["step"]: m for m in result["curves"] if m["split"] == split}
    return [by_step[k] for k in sorted(by_step)]


def held_out(result: dict, split: str) -> tuple[dict, dict]:
    """(metrics, per_pair) of a result on a held-out split: "eval" is the validation pairs train.py
    scored, any other name an extra split evaluate_on scored ("test", "validation_marked")."""
    return (result["eval"], result["per_pair"]) if split == "eval" else (result[split]["metrics"], result[split]["per_pair"])


def study_results(results_dir: str, phase: str) -> list[dict]:
    """The result files of one phase of the study, by file name."""
    return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(results_dir, "study", phase, "*.json")))]


def save_figure(fig, path: str) -> None:
    """Write a report figure and free it (reports may run one after another in one process)."""
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_report(results_dir: str, name: str, fig, rows: list[str]) -> None:
    """An experiment's table and figure: results_dir/NAME.md and results_dir/figures/NAME_curves.png."""
    fig_dir = os.path.join(results_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    save_figure(fig, os.path.join(fig_dir, f"{name}_curves.png"))
    write_text(os.path.join(results_dir, f"{name}.md"), "\n".join(rows) + "\n")
    print("\n".join(rows))
    print(f"wrote {results_dir}/{name}.md and {fig_dir}/{name}_curves.png")


def splice(results_dir: str, block: str, text: str) -> None:
    """Put text between <!-- BEGIN block --> and <!-- END block --> in the report.md beside
    results_dir, so the report's tables are always the ones rebuilt from results/."""
    path = os.path.join(os.path.dirname(os.path.abspath(results_dir)), "report.md")
    if os.path.basename(os.path.abspath(results_dir)) != "results" or not os.path.exists(path):
        return  # only the report beside a results/ directory (other studies keep their own tables)
    doc = open(path).read()
    begin, end = f"<!-- BEGIN {block} -->", f"<!-- END {block} -->"
    if begin in doc and end in doc:
        doc = doc[:doc.index(begin) + len(begin)] + "\n" + text.strip() + "\n" + doc[doc.index(end):]
        with open(path, "w") as f:
            f.write(doc)
        print(f"updated the {block} block of report.md")
