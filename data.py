"""
Preference data: reading, normalising, tokenising, batching.

Row formats accepted (one dataset may not mix them):
  {"prompt", "chosen_response", "rejected_response"}   the design card's names
  {"prompt", "chosen", "rejected"}                     strings, or lists of chat messages; a string
                                                       prompt beside whole conversations takes their
                                                       shared history instead (as TRL does)
  {"chosen", "rejected"}                               implicit prompt: full dialogues (or message
                                                       lists) sharing a prefix, as in HH-RLHF
Sources: a .json/.jsonl/.csv/.parquet file (optionally .gz), a directory written by
datasets.save_to_disk, a hub dataset name, or "demo" (a generated toy set, see make_demo_pairs).

Tokenisation. With a chat template (the default when the tokenizer has one) the prompt is
rendered with add_generation_prompt=True, exactly as at inference, and the response follows it
verbatim, then the template's end of turn (up to EOS; EOS is appended when the template adds
none). The response never goes through the template, which may rewrite it (see render_prompt).
A generation prompt that pre-fills an open reasoning block (DeepSeek-R1-Distill since
2025-02-09: `<think>\n`) is handled by --think_prefill (see response_text). Every prompt
message must survive rendering, else the row is skipped. Without a template the prompt is raw
text and the response is `text + EOS`. A templated text already holds its BOS, so it is
tokenised without special tokens (no double BOS).

Truncation rule: a prompt longer than max_prompt_length keeps its LAST max_prompt_length
tokens (the turn being answered), whatever the response length; then responses are cut so that
prompt + response <= max_length. Both are counted in the data report. A response ends at its
first EOS (anything a template adds after it, such as a newline, is dropped).

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
from collections import Counter

import torch


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
# tokenising


def _as_messages(prompt: str | list[dict]) -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def _as_text(prompt: str | list[dict]) -> str:
    if isinstance(prompt, str):
        return prompt
    names = {"user": "Human", "assistant": "Assistant", "system": "System", "tool": "Tool"}
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in prompt) + "\n\nAssistant:"


_SENTINEL = "\u2063RESPONSE\u2063"  # stands in for a response when the template shows us its frame
THINK_PREFILL_CHOICES = ("close", "open", "drop")
_THINK_OPEN, _THINK_CLOSE, _EMPTY_THINK = "<think>", "</think>", "<think>\n\n</think>\n\n"


def render_prompt(tokenizer, messages: list[dict], think_prefill: str = "close") -> tuple[str, str, str]:
    """(prompt, prefill, end) of a templated pair: the prompt text exactly as the model sees it at
    inference (rendered with the generation prompt), the part of the generation prompt that
    pre-fills the answer (DeepSeek-R1's `<think>\\n` since 2025-02-09; '' for most templates), and
    the text the template writes after an assistant message (its end-of-turn, e.g. EOS).

    The response itself is never rendered through the template: templates may rewrite it (the
    DeepSeek-R1 template drops everything up to `</think>` from assistant turns). A sentinel
    message shows where the template puts an assistant turn, and the response text goes there
    verbatim. think_prefill="drop" ends the prompt before the pre-fill (what TRL 1.16 does).
    """
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    framed = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": _SENTINEL}], tokenize=False)
    at = framed.find(_SENTINEL)
    if at < 0 or framed.count(_SENTINEL) != 1 or not prompt.startswith(framed[:at]):
        raise BadRow("template_mismatch", "the chat template does not put an assistant message right after the "
                     "generation prompt (e.g. it stamps the date); try --no_chat_template")
    cursor = 0  # every prompt message must survive rendering, in order (templates drop unknown roles)
    for k, m in enumerate(messages):
        text = m["content"].split(_THINK_CLOSE)[-1] if m["role"] == "assistant" else m["content"]
        found = prompt.find(text, cursor)  # (earlier assistant turns lose their reasoning, as at inference)
        if found < 0:
            raise BadRow("message_dropped", f"the chat template drops message {k} (role {m['role']!r}); "
                         "use system/user/assistant roles, or --no_chat_template")
        cursor = found + len(text)
    prefill = prompt[at:]
    if think_prefill == "drop" and prefill:
        prompt, prefill = prompt[:at], ""
    return prompt, prefill, framed[at + len(_SENTINEL):]


def response_text(response: str, prefill: str, think_prefill: str = "close") -> str:
    """The text that follows the rendered prompt for one response.

    A response that repeats the pre-fill (e.g. starts with `<think>\\n`) continues the prompt's
    copy of it. After a pre-fill that opens a reasoning block, a response with no `</think>` gets
    an empty reasoning block closed before it (think_prefill="close", the default: what the
    model itself writes when it skips reasoning, `<think>\\n\\n</think>\\n\\n`), or is trained
    right after the open block ("open"). A response with a reasoning block keeps all of it.
    """
    if not prefill:
        return response
    if response.startswith(prefill):
        return response[len(prefill):]
    tag = prefill.strip()
    if tag and response.lstrip().startswith(tag):
        return response.lstrip()[len(tag):].lstrip("\n")
    opens_reasoning = _THINK_OPEN in prefill and _THINK_CLOSE not in prefill
    if opens_reasoning and _THINK_CLOSE not in response and think_prefill == "close":
        closing = _EMPTY_THINK[len(prefill):] if _EMPTY_THINK.startswith(prefill) else _THINK_CLOSE + "\n\n"
        return closing + response
    return response


def prompt_tokens(tokenizer, prompt, use_chat_template: bool = True,
                  think_prefill: str = "close") -> tuple[list[int], str, str]:
    """(token ids, prefill, end) of a prompt as the model sees it at inference: rendered with the
    generation prompt (render_prompt's prefill and end of turn) or, without a template, the raw
    text; never two BOS."""
    if use_chat_template and tokenizer.chat_template is not None:
        prompt_text, prefill, end = render_prompt(tokenizer, _as_messages(prompt), think_prefill)
        ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]  # the text holds its BOS
    else:
        ids, prefill, end = tokenizer(_as_text(prompt))["input_ids"], "", ""
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]  # a template's BOS plus the tokenizer's
    return ids, prefill, end


def tokenize_pair(tokenizer, prompt, chosen: str, rejected: str, max_length: int, max_prompt_length: int,
                  use_chat_template: bool = True, think_prefill: str = "close") -> tuple[dict, list[str]]:
    """Token ids of one pair -> ({prompt_ids, chosen_ids, rejected_ids}, [events]).

    prompt_ids + chosen_ids is what the model sees at inference: the prompt rendered with the
    generation prompt, then the response's own tokens (see response_text), then the template's
    end of turn up to EOS (EOS is appended when it has none). chosen_ids / rejected_ids are the
    response tokens only. events lists what truncation did.
    """
    eos = tokenizer.eos_token_id
    prompt_ids, prefill, end = prompt_tokens(tokenizer, prompt, use_chat_template, think_prefill)
    if use_chat_template and tokenizer.chat_template is not None:
        responses = [response_text(t, prefill, think_prefill) + end for t in (chosen, rejected)]
    else:
        joined = _as_text(prompt).endswith((" ", "\n"))  # else a space separates prompt and response
        responses = [t if joined else " " + t.lstrip() for t in (chosen, rejected)]
    resp_ids = []
    for text in responses:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ids[:ids.index(eos) + 1] if eos in ids else ids + [eos]
        resp_ids.append(ids)

    events = []
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
        events.append("prompt_truncated")
    room = max_length - len(prompt_ids)
    for i in range(2):
        if len(resp_ids[i]) > room:
            resp_ids[i] = resp_ids[i][:room]
            events.append("response_truncated")
    if resp_ids[0] == resp_ids[1]:
        raise BadRow("identical_after_truncation",
                     f"responses agree on their first {room} tokens; raise --max_length")
    return dict(prompt_ids=prompt_ids, chosen_ids=resp_ids[0], rejected_ids=resp_ids[1]), events


def structure_tokens(tokenizer) -> list[str]:
    """The tokenizer's special tokens as text (BOS, EOS, turn markers such as DeepSeek's `<｜User｜>`
    or SmolLM2's `<|im_start|>`): written inside a prompt or response they would be read as the real
    token, so a data row could forge turns the chat template never rendered. Added tokens that are
    not special (DeepSeek's `<think>` / `</think>`) are ordinary text of a response and stay."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return sorted({t.content for t in added.values() if t.special} | set(tokenizer.all_special_tokens), key=len,
                  reverse=True)


def check_plain_text(prompt, chosen: str, rejected: str, markers: list[str]) -> None:
    """BadRow('special_token_in_text') when any text of the row holds one of `markers`."""
    texts = [("prompt", prompt)] if isinstance(prompt, str) else [(f"prompt message {k}", m["content"])
                                                                 for k, m in enumerate(prompt)]
    for where, text in texts + [("chosen response", chosen), ("rejected response", rejected)]:
        hit = next((t for t in markers if t in text), None)
        if hit:
            raise BadRow("special_token_in_text", f"the {where} contains the tokenizer's special token {hit!r}, which "
                         "would become a real turn or sequence marker; remove it from the data")


def build_examples(rows: list, tokenizer, max_length: int, max_prompt_length: int,
                   use_chat_template: bool = True, strict: bool = False, name: str = "data",
                   think_prefill: str = "close"):
    """Tokenised examples and a report {rows, kept, skipped: {reason: n}, truncated: {...}, ...}."""
    if max_prompt_length >= max_length:
        raise DataError(f"--max_prompt_length ({max_prompt_length}) must be < --max_length ({max_length}) "
                        "to leave room for a response")
    if not rows:
        raise DataError(f"{name}: the dataset is empty; check --dataset and --split")
    examples, skipped, events, first_bad = [], Counter(), Counter(), {}
    markers, numbers = structure_tokens(tokenizer), row_numbers(rows)
    for i, row in zip(numbers, rows):  # i: the row's number in its source file
        try:
            prompt, c, r = normalize_row(row)
            check_plain_text(prompt, c, r, markers)
            ex, ev = tokenize_pair(tokenizer, prompt, c, r, max_length, max_prompt_length, use_chat_template,
                                   think_prefill)
        except BadRow as e:
            if strict:
                raise DataError(f"{name} row {i}: {e} (drop --strict_data to skip such rows)") from None
            skipped[e.reason] += 1
            first_bad.setdefault(e.reason, f"row {i}: {e}")
            continue
        ex["row"], ex["prompt_truncated"] = i, "prompt_truncated" in ev  # for per-pair analyses
        examples.append(ex)
        events.update(ev)
    if not examples:
        raise DataError(f"{name}: no usable rows out of {len(rows)} (skipped: {dict(skipped)}; "
                        f"first problems: {first_bad})")
    lengths = sorted(len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples)
    report = dict(rows=len(rows), kept=len(examples), skipped=dict(skipped), first_skipped=first_bad,
                  truncation=dict(events), max_pair_tokens=lengths[-1],
                  median_pair_tokens=lengths[len(lengths) // 2])
    return examples, report


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
# batching


def collate(examples: list[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pairs -> one batch for the concatenated forward. Every tensor is (2B, T); rows [:B] are
    prompt+chosen and rows [B:] prompt+rejected. loss_mask marks response tokens, prompt_mask
    prompt tokens. Examples that carry cached reference log-probs add reference_logps (2B,)."""
    seqs, loss, prompt = [], [], []
    for key in ("chosen_ids", "rejected_ids"):
        for e in examples:
            p, r = e["prompt_ids"], e[key]
            seqs.append(p + r)
            loss.append([0] * len(p) + [1] * len(r))
            prompt.append([1] * len(p) + [0] * len(r))
    T = max(len(s) for s in seqs)

    def pad(rows, value):
        if padding_side == "right":
            return torch.tensor([r + [value] * (T - len(r)) for r in rows])
        return torch.tensor([[value] * (T - len(r)) + r for r in rows])

    batch = dict(input_ids=pad(seqs, pad_token_id), attention_mask=pad([[1] * len(s) for s in seqs], 0),
                 loss_mask=pad(loss, 0), prompt_mask=pad(prompt, 0))
    if "reference_chosen_logps" in examples[0]:  # a precomputed reference cache
        batch["reference_logps"] = torch.tensor([e["reference_chosen_logps"] for e in examples] +
                                                [e["reference_rejected_logps"] for e in examples])
    batch["pack_plan"], batch["pack_unpack"] = plan_packing(batch["input_ids"], batch["attention_mask"],
                                                            batch["prompt_mask"])
    return batch


def plan_packing(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared-prompt layout of a pair batch as small index tensors, computed here on the CPU
    (collate calls it before the batch moves to a GPU, so the forward never waits on a copy back).
    input_ids, attention_mask, prompt_mask (2B, T), rows [:B] prompt+chosen and [B:] prompt+rejected
    with equal prompts.

    Each pair becomes one unit [prompt | chosen | rejected] with positions 0..p-1, p..p+c-1,
    p..p+r-1; units go into rows of the longest unit's length, first-fit decreasing, the leftover
    positions padding. Returns plan (4, R, L) long: for each packed slot the padded batch's flat
    position feeding it, its position id, its part (0 prompt, 1 chosen, 2 rejected) and its unit
    (padding: a negative unit of its own per slot); and unpack (2B*T,): each padded position's slot
    in the flattened (R*L) layout (the rejected row's prompt positions read the shared prompt's
    slots; padding positions point anywhere). beta_head.pack_pairs turns it into the forward's
    inputs and attention mask on the device.
    """
    N, T = input_ids.shape
    B = N // 2
    am, pm = attention_mask.bool().cpu(), (prompt_mask.bool() & attention_mask.bool()).cpu()
    ids = input_ids.cpu()
    units = []  # per pair: its tokens' flat positions in the padded batch, position ids, part, and the
    #             rejected row's prompt positions, which read the shared prompt
    for i in range(B):
        p, pr = pm[i].nonzero().squeeze(1), pm[B + i].nonzero().squeeze(1)
        if not torch.equal(ids[i, p], ids[B + i, pr]):
            raise ValueError(f"pair {i}: the chosen and rejected rows have different prompts; "
                             "pack_pairs needs the pair layout of data.collate")
        c, r = (am[i] & ~pm[i]).nonzero().squeeze(1), (am[B + i] & ~pm[B + i]).nonzero().squeeze(1)
        n_p = len(p)
        units.append(dict(src=torch.cat([i * T + p, i * T + c, (B + i) * T + r]),
                          pos=torch.cat([torch.arange(n_p), n_p + torch.arange(len(c)), n_p + torch.arange(len(r))]),
                          part=torch.cat([torch.zeros(n_p, dtype=torch.long), torch.ones(len(c), dtype=torch.long),
                                          torch.full((len(r),), 2)]),
                          alias=(B + i) * T + pr))
    L = max(len(u["src"]) for u in units)
    rows, used = [], []  # the units in each row, and the row's filled length
    for k in sorted(range(B), key=lambda k: -len(units[k]["src"])):  # first-fit decreasing
        n = len(units[k]["src"])
        j = next((j for j in range(len(rows)) if used[j] + n <= L), len(rows))
        if j == len(rows):
            rows.append([])
            used.append(0)
        rows[j].append(k)
        used[j] += n
    R = len(rows)
    plan = torch.zeros(4, R * L, dtype=torch.long)  # src, pos, part, unit
    plan[3] = -1 - torch.arange(R * L)               # padding: a unit of its own per slot
    unpack = torch.zeros(N * T, dtype=torch.long)
    for j, members in enumerate(rows):
        start = j * L
        for k in members:
            u, n = units[k], len(units[k]["src"])
            sl = slice(start, start + n)
            plan[0, sl], plan[1, sl], plan[2, sl], plan[3, sl] = u["src"], u["pos"], u["part"], k
            unpack[u["src"]] = torch.arange(start, start + n)
            unpack[u["alias"]] = unpack[u["src"][:len(u["alias"])]]
            start += n
    return plan.view(4, R, L), unpack


class PairBatchSampler(torch.utils.data.Sampler):
    """Deterministic batches for one process: epoch e is a permutation seeded by (seed, e); a
    global batch of batch_size * num_processes pairs is cut into per-process slices. Starting at
    `start_batch` (global batches since the start of training) resumes the exact data order.
    The last incomplete global batch of each epoch is dropped."""

    def __init__(self, n: int, batch_size: int, seed: int, num_processes: int = 1, rank: int = 0,
                 start_batch: int = 0):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.num_processes, self.rank, self.start_batch = num_processes, rank, start_batch
        self.per_epoch = n // (batch_size * num_processes)
        if self.per_epoch == 0:
            raise DataError(f"{n} pairs cannot fill one global batch of {batch_size} x {num_processes} "
                            "processes; lower --batch_size or add data")

    def __iter__(self):
        b = self.start_batch
        while True:  # endless: the training loop decides when to stop
            epoch, k = divmod(b, self.per_epoch)
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g)
            G = self.batch_size * self.num_processes
            start = k * G + self.rank * self.batch_size
            yield perm[start:start + self.batch_size].tolist()
            b += 1


def eval_batches(examples: list[dict], batch_size: int, num_processes: int = 1, rank: int = 0):
    """Index lists covering examples in order, sharded across processes (the tail is padded by
    repeating the last pair; callers trim gathered results to len(examples))."""
    idx = list(range(len(examples)))
    G = batch_size * num_processes
    idx += [idx[-1]] * ((-len(idx)) % G)
    for s in range(0, len(idx), G):
        yield idx[s + rank * batch_size: s + (rank + 1) * batch_size]


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
