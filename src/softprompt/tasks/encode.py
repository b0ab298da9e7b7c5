"""Turning task rows into token batches: fill the template, cut the named field to fit (never the template or
the answer), left-pad so that the answer position is the last column of every row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SoftPromptError
from .spec import MASK_FIELD, TaskSpec


@dataclass(frozen=True)
class Verbalizer:
    """A task's scored words as token ids: candidates[i] belongs to label candidate_label[i]."""

    candidates: tuple[tuple[int, ...], ...]
    candidate_label: tuple[int, ...]
    n_labels: int

    @property
    def single_token(self) -> bool:
        return all(len(c) == 1 for c in self.candidates)

    @property
    def verbalizer(self) -> Verbalizer:
        """What the scorer (``softprompt.scoring``) needs of this task's label words."""
        return Verbalizer(tuple(map(tuple, self.candidates)), tuple(self.candidate_label), len(self.task.labels))


# None: sorted rows in batches of batch_size. A share (0.05) also cuts a batch where the next row would make padding
# pass that share of its tokens: measured slower (128 test rows, fp32: 6.64 s vs 5.80 s; benchmarks/
# classification_path.py), the smaller batches it makes cost more than the padding they save
PAD_TOLERANCE: float | None = None


def length_batches(lengths: list[int], batch_size: int, pad_tolerance: float | None = None) -> list[list[int]]:
    """Indices sorted by length, cut into batches of at most batch_size rows; with pad_tolerance, a batch is also
    cut where the next (longer) row would make padding exceed that share of the batch's computed tokens, so
    longer rows come in smaller batches instead of padding their neighbours."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    real = 0
    for i in order:
        n = lengths[i]
        if cur and (len(cur) == batch_size or (pad_tolerance is not None
                                                and (len(cur) + 1) * n > (1 + pad_tolerance) * (real + n))):
            batches.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += n
    return batches + [cur] if cur else batches


@dataclass
class BadRows:
    skipped: int = 0
    first: str = ""


def check_rows(rows: list[dict], split: str, problem_of, skip_bad_rows: bool = False) -> tuple[list[dict], BadRows]:
    """The rows without a problem (``problem_of(row)``: None or what is wrong); the first bad row is a one-line error
    unless skip_bad_rows (then counted). Every task's encoder checks its rows through here."""
    good, bad = [], BadRows()
    for i, row in enumerate(rows):
        problem = problem_of(row)
        if problem is None:
            good.append(row)
            continue
        if not skip_bad_rows:
            raise SoftPromptError(f"{split} row {i}: {problem}; fix the data or pass --skip-bad-rows")
        bad.skipped += 1
        bad.first = bad.first or f"{split} row {i}: {problem}"
    if not good:
        raise SoftPromptError(f"the {split} split is empty" + (f" after skipping {bad.skipped} bad rows" if bad.skipped else ""))
    return good, bad


def left_pad(seqs: list[list[int]], pad_id: int, device=None, labels: list[list[int]] | None = None):
    T = max(map(len, seqs))
    ids = torch.tensor([[pad_id] * (T - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs], device=device)
    if labels is None:
        return ids, mask
    lab = torch.tensor([[-100] * (T - len(s)) + s for s in labels], device=device)
    return ids, mask, lab


class TaskEncoder:
    """Encodes rows of one task for one tokenizer and prompt length."""

    def __init__(self, task: TaskSpec, tokenizer, num_virtual_tokens: int = 0, max_positions: int | None = None,
                 pad_id: int = 0, prefix: str = ""):
        if tokenizer is None:
            raise SoftPromptError("tasks need a backbone with a tokenizer")
        self.task, self.tok, self.pad_id, self.prefix = task, tokenizer, pad_id, prefix
        self.truncate_field = task.truncate_field or task.fields[0]
        # candidates: every verbalizer word as token ids, and which label each belongs to
        self.candidates: list[list[int]] = []
        self.candidate_label: list[int] = []
        for i, (label, words) in enumerate(task.verbalizer.items()):
            for w in words:
                ids = tokenizer(w, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise SoftPromptError(f"verbalizer word {w!r} of label {label!r} tokenises to nothing; "
                                          "use a word with visible characters")
                self.candidates.append(ids)
                self.candidate_label.append(i)
        if task.masked and type(self) is TaskEncoder:
            raise SoftPromptError(f"task {task.name!r}: {{{MASK_FIELD}}} in the template is for masked-LM encoders "
                                  "(BERT family); for this model put the answer after the template instead")
        answer = max(map(len, self.candidates)) if self.candidates and not task.masked else 0
        limit = task.max_length
        if max_positions is not None:
            limit = min(limit, max_positions - num_virtual_tokens)
        self.limit = limit  # template + answer tokens
        self.answer_budget = answer if task.kind == "classification" else None
        if self.limit <= answer:
            raise SoftPromptError(f"no room for the input: max_length {task.max_length} with {num_virtual_tokens} "
                                  f"virtual tokens leaves {self.limit} positions; raise max_length or shorten the prompt")

    @property
    def single_token(self) -> bool:
        return all(len(c) == 1 for c in self.candidates)

    @property
    def verbalizer(self) -> Verbalizer:
        """What the scorer (``softprompt.scoring``) needs of this task's label words."""
        return Verbalizer(tuple(map(tuple, self.candidates)), tuple(self.candidate_label), len(self.task.labels))

    # --- rows -------------------------------------------------------------------------------------------
    def row_problem(self, row: dict) -> str | None:
        for f in self.task.fields:
            if f not in row or row[f] is None:
                return f"missing field {f!r}"
        if self.task.kind == "classification":
            label = row.get(self.task.label_field)
            if str(label) not in self.task.verbalizer:
                return f"label {label!r} is not in the verbalizer ({', '.join(self.task.labels)})"
        else:
            if row.get(self.task.target_field) in (None, ""):
                return f"missing target field {self.task.target_field!r}"
        return None

    def check_rows(self, rows: list[dict], split: str, skip_bad_rows: bool = False) -> tuple[list[dict], BadRows]:
        return check_rows(rows, split, self.row_problem, skip_bad_rows)

    # --- encoding ---------------------------------------------------------------------------------------
    def _fill(self, row: dict, field_text: str | None = None) -> list[int]:
        values = {f: str(row[f]) for f in self.task.fields}
        if self.task.masked:
            values[MASK_FIELD] = self.tok.mask_token
        if field_text is not None:
            values[self.truncate_field] = field_text
        return self.tok(self.prefix + self.task.template.format(**values))["input_ids"]

    def encode_input(self, row: dict, budget: int | None = None) -> list[int]:
        """Template filled with the row; the truncate field is cut until the whole fits in `budget` tokens."""
        budget = budget if budget is not None else self.limit - (self.answer_budget or 0)
        ids = self._fill(row)
        if len(ids) <= budget:
            return ids
        field_ids = self.tok(str(row[self.truncate_field]), add_special_tokens=False)["input_ids"]
        keep = len(field_ids) - (len(ids) - budget)
        while keep > 0:
            ids = self._fill(row, self.tok.decode(field_ids[:keep]))
            if len(ids) <= budget:
                return ids
            keep -= len(ids) - budget  # re-tokenisation can merge differently: cut again by the excess
        raise SoftPromptError(f"the template alone is longer than the {budget} tokens available; raise max_length "
                              "or shorten the template/prompt")

    def label_index(self, row: dict) -> int:
        return self.task.labels.index(str(row[self.task.label_field]))

    def classification_batch(self, rows: list[dict], device=None) -> dict:
        ids, mask = left_pad([self.encode_input(r) for r in rows], self.pad_id, device)
        y = torch.tensor([self.label_index(r) for r in rows], device=device)
        return {"input_ids": ids, "attention_mask": mask, "y": y}

    def generation_batch(self, rows: list[dict], device=None) -> dict:
        seqs, labels = [], []
        eos = [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []
        for r in rows:
            target = self.tok(str(r[self.task.target_field]), add_special_tokens=False)["input_ids"] + eos
            if len(target) >= self.limit:
                target = target[: self.limit // 2]  # an over-long answer keeps its start; the input keeps the rest
            inp = self.encode_input(r, budget=self.limit - len(target))
            seqs.append(inp + target)
            labels.append([-100] * len(inp) + target)
        ids, mask, lab = left_pad(seqs, self.pad_id, device, labels)
        return {"input_ids": ids, "attention_mask": mask, "labels": lab}

    def batch(self, rows: list[dict], device=None) -> dict:
        return (self.classification_batch if self.task.kind == "classification" else self.generation_batch)(rows, device)

    def count(self, rows: list[dict]) -> int:
        """The loss normaliser of a global batch: examples (classification) or target tokens (generation)."""
        if self.task.kind == "classification":
            return len(rows)
        return int((self.generation_batch(rows)["labels"] != -100).sum())

    def units(self, batch: dict, num_virtual_tokens: int = 0) -> torch.Tensor:
        """What the throughput counts: tokens computed (the rows' and the prompt's)."""
        return batch["attention_mask"].sum() + num_virtual_tokens * batch["attention_mask"].shape[0]

    def lengths(self, rows: list[dict]) -> list[int]:
        """Token counts of rows (what length buckets sort by)."""
        if self.task.kind == "classification":
            return [len(self.encode_input(r)) for r in rows]
        return [int(self.generation_batch([r])["attention_mask"].sum()) for r in rows]

    def eval_batches(self, rows: list[dict], batch_size: int, device=None):
        """(indices, batch) over rows sorted by length (little padding per batch), classification inputs."""
        ids = [self.encode_input(r) for r in rows]
        for idx in length_batches(list(map(len, ids)), batch_size, PAD_TOLERANCE):
            input_ids, mask = left_pad([ids[i] for i in idx], self.pad_id, device)
            y = torch.tensor([self.label_index(rows[i]) for i in idx], device=device)
            yield idx, {"input_ids": input_ids, "attention_mask": mask, "y": y}

    # --- scoring ---------------------------------------------------------------------------------------
    def label_scores(self, model, batch: dict, normalize: bool = True) -> torch.Tensor:
        """(B, n_labels) log-likelihood of each label's words at the answer position, through the one scorer
        (``softprompt.scoring.label_scores``, which ``model.label_scores`` calls)."""
        return model.label_scores(batch["input_ids"], batch["attention_mask"], self.verbalizer, normalize,
                                  self.pad_id)


class EncoderTaskEncoder(TaskEncoder):
    """Rows of a classification task for a text encoder (BERT family). Scored through the prompt's task head on
    pooled final states, or, when the template has a ``{mask}`` slot, through the masked-LM head at that token
    (each label word one token: a masked LM fills one slot)."""

    def __init__(self, task: TaskSpec, backbone, num_virtual_tokens: int = 0):
        if task.kind != "classification":
            raise SoftPromptError(f"task {task.name!r} generates text, but {backbone.name!r} is a text encoder; use "
                                  "a classification task (a verbalizer) or a causal or seq2seq model")
        super().__init__(task, backbone.tokenizer, num_virtual_tokens, backbone.max_positions, backbone.pad_token_id)
        self.needs_head = not task.masked  # the method gets a task head (methods.Headed)
        if task.masked:
            if getattr(backbone, "mlm_head", None) is None:
                raise SoftPromptError(f"{backbone.name!r} has no masked-LM head (a bare encoder checkpoint): a "
                                      f"{{{MASK_FIELD}}} template cannot be scored on it; drop {{{MASK_FIELD}}} to "
                                      "train a classification head instead")
            long = [w for w, ids in zip((w for ws in task.verbalizer.values() for w in ws), self.candidates,
                                        strict=True) if len(ids) != 1]
            if long:
                raise SoftPromptError(f"verbalizer word {long[0]!r} is more than one token for {backbone.name!r}; a "
                                      f"masked LM fills one {{{MASK_FIELD}}} slot: pick one-token words")

    def label_scores(self, model, batch: dict, normalize: bool = True) -> torch.Tensor:
        if not self.needs_head:
            return super().label_scores(model, batch, normalize)
        logits = model.classify_tokens(batch["input_ids"], batch["attention_mask"]).float()
        return logits.log_softmax(-1) if normalize else logits
