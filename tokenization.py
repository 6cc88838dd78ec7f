"""
A preference pair as token ids: the chat template, a reasoning block's prefill, truncation,
and build_examples, which turns rows into the tokenised pairs training and evaluation use.

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
"""

from collections import Counter

from data import BadRow, DataError, normalize_row, row_numbers




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


