"""
Batches of pairs: padding into the concatenated (2B, T) layout, the plan of the shared-prompt
packed layout, and which pairs each process reads at each step (training and evaluation).
"""

import torch

from data import DataError




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
    slots; padding positions point anywhere). logprobs.pack_pairs turns it into the forward's
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
                             "pack_pairs needs the pair layout of batching.collate")
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

