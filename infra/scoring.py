"""Scoring texts with trained reward models: the IRM's one logit, the PRM's per-step probability.

This runs a model, like the engines, so it sits in infra, below every stage that scores: Active
Evol-Instruct's elimination (a data stage), the IRM's and PRM's training (held-out metrics) and
the RL reward all load a checkpoint and score through here. What the texts say (the IRM's
prompt, the PRM's Alpaca prompt) is the tasks' business (`tasks.evolution.instruction_reward`,
`tasks.training.formats`); this module only places them in the model.

- `IrmScorer` reads a sequence-classification checkpoint (trl's RewardTrainer, one logit) and
  scores full IRM inputs, each followed by eos as RewardTrainer trained on them (the classifier
  reads the last non-pad token). `scores` maps the logit through a sigmoid into (0, 1), the
  scale rI and the Active Evol-Instruct threshold use.
- `PrmScorer` reads a token-classification checkpoint (two labels: 0 wrong, 1 correct) and gives
  every step the probability that it is correct, read at the token that holds the step's last
  visible character; `encode_steps` is that placement (`join_steps` the text), shared with the
  PRM's training collator so training and scoring see the same tokens. A step cut off by
  `max_length` has no probability (None).
- **Placement.** `load` puts a scorer's model on the best device there is and picks its dtype
  (`scoring_placement`): `auto` is CUDA when torch sees a GPU, else the CPU; in bfloat16 on a
  GPU that computes it, float32 everywhere else. The CPU stays in float32 although the embedded
  engine decodes in bf16 on CPUs with native bf16 (`infra.engines.cpu.choose_dtype`): a score is
  compared with thresholds (the Active Evol-Instruct cut, the min over steps), bf16 moves a
  sigmoid by about 1e-2, and scoring is one forward pass per text, where bf16 gains little on
  a CPU; so CPU scores stay what they were. Inputs go to the model's device; scores come back
  as Python floats.
- `resolve_checkpoint` turns what a config names (`irm_model@<version>` from the `models` view,
  or a folder) into a folder.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Self

IGNORE = -100
WRONG, CORRECT = 0, 1


def resolve_checkpoint(ref: str | Path, home: Path | None = None) -> Path:
    """A model checkpoint's folder from `name@version` (a version id or unique prefix) or a path."""
    text = str(ref)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if "@" not in text:
        raise ValueError(f"model {text!r} is neither a checkpoint folder nor NAME@VERSION")
    from storage.datasets import DatasetStore
    from storage.settings import home as default_home

    store = DatasetStore(home or default_home())
    manifest = store.resolve(text)
    if manifest.kind != "model":
        raise ValueError(f"{manifest.ref} is a {manifest.kind}, not a model checkpoint")
    return store.version_dir(manifest.name, manifest.version)


def load_tokenizer(path: str, padding_side: str = "right") -> Any:
    """The model's tokenizer with a pad token (the eos token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


ScoringDevice = Literal["auto", "cpu", "cuda"]
ScoringDtype = Literal["auto", "float32", "bfloat16", "float16"]


def scoring_placement(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """The device and dtype a reward model scores on (see the module docstring): `auto` is
    CUDA when available, else the CPU; bfloat16 on a GPU that has it, else float32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"reward model device {device!r}: torch sees no CUDA device")
    if dtype == "auto":
        cuda = device.startswith("cuda")
        dtype = "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def load_model(
    auto_cls: Any,
    path: str,
    tokenizer: Any,
    dtype: str = "float32",
    device: str | None = None,
    **kwargs: Any,
) -> Any:
    """A model in `dtype` (fp32 unless a GPU trains in bf16), on `device` when one is given
    (the trainers leave placement to the Trainer), its pad token set from the tokenizer."""
    import torch

    model = auto_cls.from_pretrained(path, dtype=getattr(torch, dtype), **kwargs)
    if device is not None:
        model = model.to(device)
    model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    return model


def _load_scorer(auto_cls: Any, path: str | Path, device: str, dtype: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a reward model checkpoint, placed by `scoring_placement`."""
    from infra.engines.cpu import log_choice_once

    device, dtype = scoring_placement(device, dtype)
    log_choice_once("scoring", f"reward models score on {device} in {dtype}")
    tokenizer = load_tokenizer(str(path))
    return load_model(auto_cls, str(path), tokenizer, dtype=dtype, device=device), tokenizer


_loaded: dict[tuple[str, str, int, str, str], Any] = {}
_loaded_lock = threading.Lock()


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _batches(n: int, size: int):
    for start in range(0, n, max(1, size)):
        yield range(start, min(n, start + max(1, size)))


class _Scorer:
    """What both reward models share: the model in eval mode, its tokenizer, the length and
    batch limits, and loading a checkpoint with the transformers class of its head."""

    auto_class = ""  # the transformers Auto class of the model's head

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 512, batch_size: int = 8):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def load(
        cls, path: str | Path, device: str = "auto", dtype: str = "auto", **kwargs: Any
    ) -> Self:
        import transformers

        head = getattr(transformers, cls.auto_class)
        model, tokenizer = _load_scorer(head, path, device, dtype)
        return cls(model, tokenizer, **kwargs)


class IrmScorer(_Scorer):
    """The instruction reward model on full IRM inputs: `logits` (raw) and `scores` (sigmoid)."""

    auto_class = "AutoModelForSequenceClassification"

    @classmethod
    def cached(
        cls, path: str | Path, max_length: int = 512, device: str = "auto", dtype: str = "auto"
    ) -> IrmScorer:
        """One loaded IRM per (folder, max length, placement) and process: the shards of a stage
        share it."""
        key = ("irm", str(Path(path).resolve()), max_length, device, dtype)
        with _loaded_lock:
            if key not in _loaded:
                _loaded[key] = cls.load(path, device=device, dtype=dtype, max_length=max_length)
            return _loaded[key]

    def logits(self, texts: Sequence[str]) -> list[float]:
        """The raw logit of each full IRM input (eos is added here)."""
        import torch

        texts = [text + (self.tokenizer.eos_token or "") for text in texts]
        out: list[float] = []
        with torch.no_grad():
            for rows in _batches(len(texts), self.batch_size):
                enc = self.tokenizer(
                    [texts[i] for i in rows],
                    truncation=True,
                    max_length=self.max_length,
                    padding=True,
                    return_tensors="pt",
                ).to(_device(self.model))
                logits = self.model(**enc).logits.float()[:, 0]
                out.extend(float(v) for v in logits.tolist())
        return out

    def scores(self, texts: Sequence[str]) -> list[float]:
        """The sigmoid of each logit, in (0, 1)."""
        return [1.0 / (1.0 + math.exp(-v)) for v in self.logits(texts)]


def join_steps(prompt: str, steps: Sequence[str]) -> tuple[str, list[int]]:
    """The prompt followed by the steps, and the index of each step's last visible character.

    Steps that are exact slices of a solution (whitespace included) re-join to it; steps that
    were stripped get a line break between them, and the first gets one after the prompt.
    A step with no visible character ends where the text is (its label cannot land: -1).
    """
    text = prompt
    ends: list[int] = []
    for step in steps:
        if text and not text[-1].isspace() and step[:1] and not step[:1].isspace():
            text += "\n"
        text += step
        stripped = len(text.rstrip())
        ends.append(stripped - 1 if stripped > len(text) - len(step) else -1)
    return text, ends


def _token_at(offsets: Sequence[Sequence[int]], char: int, start: int = 0) -> int | None:
    """The first token at or after `start` whose character span holds `char`."""
    for t in range(start, len(offsets)):
        s, e = offsets[t]
        if s <= char < e:
            return t
        if s > char:
            return None
    return None


def encode_steps(
    tokenizer: Any,
    prompt: str,
    steps: Sequence[str],
    labels: Sequence[bool | None] | None = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Token ids of prompt + steps, the label of each step on the token holding its last visible
    character (every other token IGNORE), and that token's index per step (None when the step
    is empty or cut off by `max_length`)."""
    text, ends = join_steps(prompt, steps)
    enc = tokenizer(
        text,
        return_offsets_mapping=True,
        truncation=max_length is not None,
        max_length=max_length,
    )
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    token_labels = [IGNORE] * len(ids)
    positions: list[int | None] = []
    cursor = 0
    for k, end in enumerate(ends):
        t = _token_at(offsets, end, cursor) if end >= 0 else None
        positions.append(t)
        if t is None:
            continue
        cursor = t
        label = labels[k] if labels is not None else None
        if label is not None:
            token_labels[t] = CORRECT if label else WRONG
    return {"input_ids": ids, "labels": token_labels, "positions": positions, "text": text}


class PrmScorer(_Scorer):
    """The process reward model: P(step is correct) for every step of a solution."""

    auto_class = "AutoModelForTokenClassification"

    def step_probabilities(
        self, prompts: Sequence[str], steps: Sequence[Sequence[str]]
    ) -> list[list[float | None]]:
        import torch

        if len(prompts) != len(steps):
            raise ValueError(f"{len(prompts)} prompts vs {len(steps)} step lists")
        encoded = [
            encode_steps(self.tokenizer, p, s, None, self.max_length)
            for p, s in zip(prompts, steps, strict=True)
        ]
        out: list[list[float | None]] = []
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            for rows in _batches(len(encoded), self.batch_size):
                part = [encoded[i] for i in rows]
                width = max(len(e["input_ids"]) for e in part)
                ids = torch.full((len(part), width), pad, dtype=torch.long)
                mask = torch.zeros((len(part), width), dtype=torch.long)
                for j, e in enumerate(part):
                    n = len(e["input_ids"])
                    ids[j, :n] = torch.tensor(e["input_ids"])
                    mask[j, :n] = 1
                device = _device(self.model)
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                probs = torch.softmax(logits.float(), dim=-1)[..., CORRECT].cpu()
                for j, e in enumerate(part):
                    out.append([None if t is None else float(probs[j, t]) for t in e["positions"]])
        return out

    def first_errors(
        self, prompts: Sequence[str], steps: Sequence[Sequence[str]], threshold: float = 0.5
    ) -> list[int | float | None]:
        """The predicted first wrong step per solution: its index, None when every step is
        judged correct, NaN when a step before the first wrong one could not be scored."""
        out: list[int | float | None] = []
        for probs in self.step_probabilities(prompts, steps):
            prediction: int | float | None = None
            for k, p in enumerate(probs):
                if p is None:
                    prediction = math.nan
                    break
                if p < threshold:
                    prediction = k
                    break
            out.append(prediction)
        return out
