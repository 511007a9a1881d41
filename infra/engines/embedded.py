"""The embedded engine: a transformers causal LM on CPU, no network, the factory's default.

It runs its own decode loop around the model's forward pass instead of `model.generate`, because
the factory needs things `generate` does not give together:

- **Per-request seeds.** Every sample row draws from its own `torch.Generator`, seeded from the
  request's seed and the sample index, so a request's random stream does not depend on its
  neighbours in the batch. What is guaranteed: the same request in the same batch gives the same
  output bit for bit; the same request in a different batch gets the same random numbers, and its
  output differs only if padding changes a floating-point rounding enough to flip a near-tie (not
  seen on the tests' prompts, but not excluded).
- **n samples per request** as n rows (one row, copied, for greedy requests without a schema).
- **Batches grouped by prompt length**, left-padded, with finished rows dropped from the batch
  and its KV cache as they finish, so short answers do not pay for long ones.
- **Stop strings**: the text is cut at the first stop string and the finish reason is "stop".
- **JSON-schema requests** are decoded under a token mask from llguidance (constrained decoding)
  when it is installed, and always validated with `jsonschema` afterwards. A completion that
  fails validation (e.g. cut by max_tokens) is retried with a fresh seed up to `json_retries`
  times; after that the response carries `error` and keeps the raw text.

Prompts go through the model's chat template. Prompt logits are computed only for the last
position (`logits_to_keep=1`): the 49k-word output layer is a fifth of this model's weights.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from infra.engines.base import ChatRequest, ChatResponse, Completion, schema_error

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def row_seed(seed: int, sample: int, attempt: int) -> int:
    """A generator seed per (request seed, sample index, JSON retry), independent of the batch."""
    digest = hashlib.sha256(f"{seed}:{sample}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class _Row:
    """One sample being decoded."""

    request: int
    sample: int
    attempt: int
    prompt: list[int]
    generator: torch.Generator | None
    matcher: Any = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: str = "length"
    done_at: float = 0.0


class EmbeddedEngine:
    """Batched chat generation with a local transformers model on CPU."""

    def __init__(
        self,
        model: str | None = None,
        *,
        batch_size: int = 64,
        dtype: str = "auto",
        num_threads: int | None = None,
        json_retries: int = 2,
        constrained: bool = True,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from infra.models import resolve_model

        resolved = resolve_model(model)
        if dtype == "auto":
            # float32: bf16 rounding depends on the batch's shape enough to flip seeded samples
            # (the same request gave a different text alone and in a batch), which breaks the
            # reproducibility promised above. bf16 stays available for throughput runs.
            dtype = "float32"
        if dtype not in DTYPES:
            raise ValueError(
                f"embedded engine dtype must be one of {sorted(DTYPES)}, got {dtype!r}"
            )
        if num_threads:
            torch.set_num_threads(num_threads)
        self.dtype = dtype
        self.batch_size = batch_size
        self.json_retries = json_retries
        self._identity = resolved.identity
        self.tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        self.model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=DTYPES[dtype])
        self.model.eval()
        self._lock = threading.Lock()
        gen_eos = self.model.generation_config.eos_token_id
        eos = {self.tokenizer.eos_token_id}
        eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        self.eos_ids = {e for e in eos if e is not None}
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = min(self.eos_ids)
        self._vocab = self.model.config.vocab_size
        self._ll_tokenizer = None
        self._constrained = constrained and _llguidance_available()

    @property
    def identity(self) -> str:
        return self._identity

    # -- public -----------------------------------------------------------------------------

    def generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        with self._lock, torch.inference_mode():
            return self._generate(requests)

    # -- internals --------------------------------------------------------------------------

    def _generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        start = time.perf_counter()
        prompts: list[list[int] | None] = []
        errors: list[str | None] = []
        for request in requests:
            try:
                prompts.append(self._encode(request))
                errors.append(None)
            except Exception as exc:
                prompts.append(None)
                errors.append(f"prompt: {type(exc).__name__}: {exc}")

        rows: list[_Row] = []
        for i, request in enumerate(requests):
            if prompts[i] is None:
                continue
            samples = request.sampling.n
            if request.sampling.temperature == 0 and request.json_schema is None:
                samples = 1  # greedy decoding gives the same text every time: decode it once
            rows.extend(self._new_row(i, j, 0, prompts[i], request) for j in range(samples))

        finished: list[_Row] = []
        pending = rows
        while pending:
            for batch in self._batches(pending):
                self._decode(batch, requests)
            retry = []
            for row in pending:
                schema = requests[row.request].json_schema
                invalid = schema is not None and schema_error(row.text, schema) is not None
                if invalid and row.attempt < self.json_retries:
                    request = requests[row.request]
                    retry.append(
                        self._new_row(row.request, row.sample, row.attempt + 1, row.prompt, request)
                    )
                else:
                    finished.append(row)
            pending = retry

        by_request: dict[int, list[_Row]] = {}
        for row in finished:
            by_request.setdefault(row.request, []).append(row)
        responses = []
        for i, request in enumerate(requests):
            if errors[i] is not None:
                responses.append(ChatResponse(completions=[], error=errors[i]))
                continue
            got = sorted(by_request[i], key=lambda r: r.sample)
            if len(got) < request.sampling.n:  # greedy request decoded once
                got = got * request.sampling.n
            completions = [
                Completion(text=r.text, finish_reason=r.finish, completion_tokens=len(r.tokens))
                for r in got
            ]
            error = None
            if request.json_schema is not None:
                problems = [schema_error(r.text, request.json_schema) for r in got]
                bad = [(k, p) for k, p in enumerate(problems) if p is not None]
                if bad:
                    k, problem = bad[0]
                    error = (
                        f"json_schema: sample {k} invalid after {self.json_retries + 1} "
                        f"tries: {problem}"
                    )
            responses.append(
                ChatResponse(
                    completions=completions,
                    prompt_tokens=len(prompts[i]),
                    latency_s=max(r.done_at for r in got) - start,
                    error=error,
                )
            )
        return responses

    def _encode(self, request: ChatRequest) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            list(request.messages), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        return list(ids)

    def _new_row(self, request: int, sample: int, attempt: int, prompt, req: ChatRequest) -> _Row:
        generator = None
        if req.sampling.temperature > 0:
            generator = torch.Generator().manual_seed(row_seed(req.sampling.seed, sample, attempt))
        matcher = None
        if req.json_schema is not None and self._constrained:
            matcher = self._matcher(req.json_schema)
        return _Row(request, sample, attempt, prompt, generator, matcher)

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        # Longest prompts first, so each batch holds prompts of similar length (little padding).
        ordered = sorted(rows, key=lambda r: -len(r.prompt))
        return [ordered[i : i + self.batch_size] for i in range(0, len(ordered), self.batch_size)]

    def _decode(self, batch: list[_Row], requests: list[ChatRequest]) -> None:
        from transformers import DynamicCache

        width = max(len(r.prompt) for r in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for k, row in enumerate(batch):
            input_ids[k, width - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[k, width - len(row.prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        active = list(range(len(batch)))
        sampling = [requests[r.request].sampling for r in batch]
        steps = max(s.max_tokens for s in sampling)

        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        for _ in range(steps):
            logits = out.logits[:, -1, : self._vocab].float()
            rows = [batch[k] for k in active]
            next_tokens = self._sample(logits, rows, [sampling[k] for k in active])
            keep = []
            now = time.perf_counter()
            for pos, (k, token) in enumerate(zip(active, next_tokens, strict=True)):
                row = batch[k]
                if self._advance(row, token, sampling[k]):
                    row.done_at = now
                else:
                    keep.append(pos)
            if not keep:
                break
            if len(keep) < len(active):
                index = torch.tensor(keep)
                cache.batch_select_indices(index)
                mask = mask[index]
                positions = positions[index]
                next_tokens = [next_tokens[p] for p in keep]
                active = [active[p] for p in keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(
                input_ids=torch.tensor(next_tokens).unsqueeze(1),
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
        for k in active:
            row = batch[k]
            if not row.done_at:
                row.text = self._text(row.tokens)
                row.done_at = time.perf_counter()

    def _advance(self, row: _Row, token: int, sampling) -> bool:
        """Append `token` to `row`; return True when the row is finished."""
        if token in self.eos_ids:
            row.tokens.append(token)
            row.text = self._text(row.tokens)
            row.finish = "stop"
            return True
        row.tokens.append(token)
        if row.matcher is not None:
            row.matcher.consume_token(token)
            if row.matcher.is_stopped() or row.matcher.is_error():
                row.text = self._text(row.tokens)
                row.finish = "stop" if row.matcher.is_accepting() else "length"
                return True
        if sampling.stop:
            text = self._text(row.tokens)
            cut = [text.find(s) for s in sampling.stop if s and s in text]
            if cut:
                row.text = text[: min(cut)]
                row.finish = "stop"
                return True
        if len(row.tokens) >= sampling.max_tokens:
            row.text = self._text(row.tokens)
            row.finish = "length"
            return True
        return False

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(
            [t for t in tokens if t not in self.eos_ids], skip_special_tokens=True
        )

    def _sample(self, logits: torch.Tensor, rows: list[_Row], sampling) -> list[int]:
        for k, row in enumerate(rows):
            if row.matcher is not None and not row.matcher.is_error():
                allowed = _unpack_mask(row.matcher.compute_bitmask(), logits.shape[1])
                logits[k].masked_fill_(~allowed, float("-inf"))
        tokens = logits.argmax(dim=-1).tolist()
        for k, (row, params) in enumerate(zip(rows, sampling, strict=True)):
            if row.generator is None:
                continue
            scores = logits[k] / params.temperature
            probs = torch.softmax(scores, dim=-1)
            if params.top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                cumulative = sorted_probs.cumsum(-1)
                # Keep the smallest prefix whose mass reaches top_p (always at least one token).
                drop = cumulative - sorted_probs >= params.top_p
                sorted_probs[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            tokens[k] = int(torch.multinomial(probs, 1, generator=row.generator))
        return tokens

    def _matcher(self, schema: dict[str, Any]):
        import llguidance
        import llguidance.hf

        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self.tokenizer, n_vocab=self._vocab, eos_token=self.tokenizer.eos_token_id
            )
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        return llguidance.LLMatcher(self._ll_tokenizer, grammar, log_level=0)


def _llguidance_available() -> bool:
    try:
        import llguidance.hf  # noqa: F401
    except ImportError:
        return False
    return True


def _unpack_mask(bitmask: bytes, vocab: int) -> torch.Tensor:
    bits = np.unpackbits(np.frombuffer(bitmask, dtype=np.uint8), bitorder="little")
    allowed = np.zeros(vocab, dtype=bool)
    n = min(vocab, bits.shape[0])
    allowed[:n] = bits[:n].astype(bool)
    return torch.from_numpy(allowed)
