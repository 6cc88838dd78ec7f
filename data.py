"""
Preference data as rows: reading files and hub datasets, normalising each row to (prompt, chosen,
rejected), the held-out split, and the generated demo set.

Row formats accepted (one dataset may not mix them):
  {"prompt", "chosen_response", "rejected_response"}   the design card's names
  {"prompt", "chosen", "rejected"}                     strings, or lists of chat messages; a string
                                                       prompt beside whole conversations takes their
                                                       shared history instead (as TRL does)
  {"chosen", "rejected"}                               implicit prompt: full dialogues (or message
                                                       lists) sharing a prefix, as in HH-RLHF
Sources: a .json/.jsonl/.csv/.parquet file (optionally .gz), a directory written by
datasets.save_to_disk, a hub dataset name, or "demo" (a generated toy set, see make_demo_pairs).

Tokenising a row is tokenization.py; batching pairs is batching.py.

Bad rows are skipped and counted by reason (strict=True raises instead, naming the row). A row
whose text holds one of the tokenizer's special tokens (`<｜User｜>`, `<|im_end|>`, EOS...) is one
of them (`special_token_in_text`): tokenised as it is, the text would become real turn boundaries.
"""

import csv
import gzip
import io
import json
import os
import random
import re
import zlib


class DataError(ValueError):
    """A problem with the user's data; the message says what to change."""


class BadRow(Exception):
    """One row that cannot be used; str(e) is the reason (a short key + detail)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# -----------------------------------------------------------------------------
# reading


def _open_text(path: str):
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def read_file(path: str) -> list[dict]:
    """Rows of a local .json, .jsonl, .csv or .parquet file (each optionally .gz)."""
    if not os.path.exists(path):
        raise DataError(f"data file {path!r} does not exist")
    base = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(base)[1].lower()
    try:
        if ext == ".parquet":
            import pyarrow.parquet as pq
            if path.endswith(".gz"):
                with gzip.open(path, "rb") as f:
                    return pq.read_table(io.BytesIO(f.read())).to_pylist()
            return pq.read_table(path).to_pylist()
        with _open_text(path) as f:
            if ext == ".csv":
                return list(csv.DictReader(f))
            if ext == ".jsonl":
                rows = []
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                        "fix or delete that line") from None
                return rows
            if ext == ".json":
                try:
                    obj = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix the file, or "
                                    "use .jsonl for one row per line") from None
                if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
                    obj = next(iter(obj.values()))  # {"data": [...]}
                if not isinstance(obj, list):
                    raise DataError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
                return obj
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid gzip file ({e}); re-compress it or drop the .gz") from None
    raise DataError(f"{path}: unknown extension {ext!r}; use .json, .jsonl, .csv or .parquet (optionally .gz)")


def load_rows(source: str, split: str = "train", config: str | None = None,
              data_dir: str | None = None) -> list[dict]:
    """Rows from a file, a save_to_disk directory, a hub dataset, or "demo"."""
    if source == "demo":
        return make_demo_pairs(split=split)
    if os.path.isfile(source):
        return read_file(source)
    if os.path.isdir(source):
        import datasets
        try:
            ds = datasets.load_from_disk(source)
        except FileNotFoundError:
            raise DataError(f"{source!r} is a directory but not one written by datasets.save_to_disk") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{source!r} has splits {list(ds)}, not {split!r}; pass --split/--eval_split")
            ds = ds[split]
        return ds.to_list()
    if source.startswith((".", "/", "~")) or source.endswith((".json", ".jsonl", ".csv", ".parquet", ".gz")):
        raise DataError(f"data path {source!r} does not exist")
    check_hub("dataset", source)  # a hub name: the only case that touches the network
    import datasets
    try:
        ds = datasets.load_dataset(source, config, data_dir=data_dir, split=split)
    except Exception as e:  # noqa: BLE001 - hub, network and cache errors alike: one line, not a traceback
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"dataset {source!r} (split {split!r}): {type(e).__name__}: {first}; check the name, "
                        "--dataset_config and --split, or pass a local file") from None
    return ds.to_list()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT, default huggingface.co) accepts a connection within
    `timeout` seconds."""
    import socket
    from urllib.parse import urlparse
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def check_hub(what: str, name: str) -> None:
    """Before anything is fetched from the hub: with no connection, one line in seconds (the hub
    libraries would retry for about a minute first). With HF_HUB_OFFLINE=1 the libraries read their
    cache and nothing is checked."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    if not hub_reachable():
        host = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        raise DataError(f"{what} {name!r} is not a local path and the hub ({host}) cannot be reached from this "
                        "machine; pass a local file or directory, or set HF_HUB_OFFLINE=1 to use a copy already in the "
                        "Hugging Face cache")


# -----------------------------------------------------------------------------
# normalising rows to (prompt, chosen, rejected)

ROLES = ("system", "user", "assistant", "tool")  # a template that drops one is caught in render_prompt
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _hh_to_messages(text: str) -> list[dict] | None:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{'role': 'user', ...}, {'role': 'assistant', ...}]."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c} for r, c in zip(parts[1::2], parts[2::2])]


def _split_messages(chosen: list[dict], rejected: list[dict]):
    """Implicit prompt for message lists: all but a final differing assistant message."""
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
        raise BadRow("no_shared_prompt", "chosen and rejected must differ only in the last message")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise BadRow("no_assistant_response", "the last message must be the assistant's")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def normalize_row(row) -> tuple[str | list[dict], str, str]:
    """(prompt, chosen, rejected): prompt a string or message list, responses strings."""
    if not isinstance(row, dict):
        raise BadRow("not_a_mapping", f"got {type(row).__name__}")
    if "chosen_response" in row or "rejected_response" in row:
        keys = ("prompt", "chosen_response", "rejected_response")
    elif "prompt" in row:
        keys = ("prompt", "chosen", "rejected")
    else:
        keys = ("chosen", "rejected")
    missing = [k for k in keys if k not in row or row[k] is None]
    if missing:
        raise BadRow("missing_field", f"missing {missing}; have {sorted(row)}")
    values = [row[k] for k in keys]
    for k, v in zip(keys, values):
        if not (isinstance(v, str) or _is_messages(v)):
            raise BadRow("not_text", f"{k!r} is {type(v).__name__}, not a string or message list")

    if len(keys) == 2:  # implicit prompt
        chosen, rejected = values
        if isinstance(chosen, str) and isinstance(rejected, str):
            c, r = _hh_to_messages(chosen), _hh_to_messages(rejected)
            if c is not None and r is not None:
                chosen, rejected = c, r
            else:
                k = len(os.path.commonprefix([chosen, rejected]))
                k = chosen.rfind(" ", 0, k + 1) + 1 if k < len(chosen) else k  # back off to a word start
                prompt, c, r = chosen[:k], chosen[k:], rejected[k:]
                chosen, rejected = None, None
        if chosen is not None:
            if not (_is_messages(chosen) and _is_messages(rejected)):
                raise BadRow("mixed_formats", "chosen and rejected must both be strings or message lists")
            prompt, c, r = _split_messages(chosen, rejected)
    else:
        prompt, c, r = values
        if isinstance(prompt, str) and _is_messages(c) and _is_messages(r) and max(len(c), len(r)) > 1:
            # a string prompt beside whole conversations: the conversations' shared history is the
            # prompt, as TRL 1.16's maybe_extract_prompt decides (it then ignores the prompt column)
            prompt, c, r = _split_messages(c, r)
        if _is_messages(c):  # conversational responses: the assistant's last message
            c = c[-1]["content"]
        if _is_messages(r):
            r = r[-1]["content"]
        if isinstance(prompt, str) and _hh_to_messages(prompt) is not None:
            prompt = prompt.rstrip()
            prompt = _hh_to_messages(prompt[:-len("Assistant:")] if prompt.endswith("Assistant:") else prompt)

    if isinstance(prompt, list):
        for k, m in enumerate(prompt):
            if m["role"] not in ROLES:
                raise BadRow("unknown_role", f"prompt message {k} has role {m['role']!r}; use one of {ROLES}")
            if not isinstance(m["content"], str):
                raise BadRow("not_text", f"prompt message {k}'s content is {type(m['content']).__name__}, not a string")
    for name, text in (("chosen", c), ("rejected", r)):
        if not isinstance(text, str) or not text.strip():
            raise BadRow("empty_text", f"{name} response is empty")
    if (isinstance(prompt, str) and not prompt.strip()) or (isinstance(prompt, list) and not prompt):
        raise BadRow("empty_text", "prompt is empty")
    if c.strip() == r.strip():
        raise BadRow("chosen_equals_rejected", "chosen and rejected responses are identical")
    return prompt, c, r


# -----------------------------------------------------------------------------
# the held-out split


class Rows(list):
    """Rows of a dataset that remember each one's row number in its source file (or hub split), so
    that a shuffled split, and any slice of it, still reports the rows a user can find in the file
    (build_examples' "row", pair_beta.jsonl, eval.json's per_pair)."""

    def __init__(self, rows: list, numbers: list[int]):
        super().__init__(rows)
        self.numbers = list(numbers)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return Rows(list.__getitem__(self, key), self.numbers[key])
        return list.__getitem__(self, key)


def row_numbers(rows: list) -> list[int]:
    """Each row's number in its source: a Rows' own, else its position."""
    return rows.numbers if isinstance(rows, Rows) else list(range(len(rows)))


def split_eval(rows: list, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """(train, eval) by a seeded shuffle; the split depends only on (len(rows), fraction, seed).
    Both keep the source's row numbers."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, round(fraction * len(rows)))
    if n_eval >= len(rows):
        raise DataError(f"--eval_fraction {fraction} leaves no training rows out of {len(rows)}")
    numbers = row_numbers(rows)
    return tuple(Rows([rows[i] for i in part], [numbers[i] for i in part]) for part in (idx[n_eval:], idx[:n_eval]))


def load_splits(source: str, split: str, eval_split: str | None, eval_fraction: float, seed: int,
                config: str | None = None, data_dir: str | None = None) -> tuple[list, list]:
    """(train rows, eval rows): eval_split names a split of source (or a file), else a seeded
    eval_fraction of the train split is held out."""
    rows = load_rows(source, split, config, data_dir)
    if eval_split:
        return rows, load_rows(eval_split if os.path.exists(eval_split) else source, eval_split, config, data_dir)
    return split_eval(rows, eval_fraction, seed)


# -----------------------------------------------------------------------------
# the demo set


_ACTIVITIES = [
    "baking bread", "running a 10k", "learning the guitar", "growing tomatoes", "painting with watercolors",
    "writing a cover letter", "studying for an exam", "planning a road trip", "cooking rice", "saving money",
    "learning to swim", "keeping a journal", "training a puppy", "making coffee", "fixing a flat tire",
    "starting a podcast", "learning Spanish", "sleeping better", "meal prepping", "hiking in the rain",
    "decluttering a closet", "taking better photos", "giving a speech", "knitting a scarf", "brewing tea",
    "learning chess", "cleaning a bike chain", "painting a room", "writing a poem", "learning to juggle",
    "repotting a plant", "making pancakes", "organizing a desk", "learning to code", "stretching after a run",
    "baking cookies", "reading more books", "camping with kids", "building a birdhouse", "drawing portraits",
    "learning to dance", "making soup", "washing a car", "practicing piano", "sewing a button",
    "setting up an aquarium", "making a budget", "learning to ski", "grilling vegetables", "writing a story",
]
_ASKS = ["Can you give me a tip for {a}?", "Any advice on {a}?", "How do I get better at {a}?",
         "I want to try {a}. Where should I start?", "What is one thing that helps with {a}?"]
_OPENERS = ["Sure!", "Of course!", "Happy to help!", "Great question!", "Glad you asked!"]
_TIPS = ["Start small with {a} and practice a little every day.",
         "For {a}, pick one simple goal and build from there.",
         "Set aside a regular time for {a} and keep notes on what works.",
         "With {a}, patience matters more than talent, so take it step by step.",
         "Ask someone experienced in {a} to show you the basics."]
_CLOSERS = ["Good luck!", "You can do it!", "Have fun with it!", "I hope this helps."]
_REFUSALS = ["No. Figure out {a} yourself.", "That is a boring question about {a}.",
             "Why would I help you with {a}? Go away.", "I do not care about {a}.",
             "Stop asking me about {a}, it is a waste of my time."]


def make_demo_pairs(split: str = "train", n: int | None = None, seed: int = 1234) -> list[dict]:
    """A generated toy preference set for the offline quickstart: helpful, friendly answers are
    chosen over dismissive ones. The split is by activity (train: the first 40, test: the last
    10), so held-out accuracy measures generalisation to unseen prompts, not memorisation."""
    acts = _ACTIVITIES[:40] if split == "train" else _ACTIVITIES[40:]
    n = n if n is not None else (480 if split == "train" else 60)
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for _ in range(n):
        a = rng.choice(acts)
        rows.append(dict(
            prompt=rng.choice(_ASKS).format(a=a),
            chosen=f"{rng.choice(_OPENERS)} {rng.choice(_TIPS).format(a=a)} {rng.choice(_CLOSERS)}",
            rejected=rng.choice(_REFUSALS).format(a=a),
        ))
    return rows
