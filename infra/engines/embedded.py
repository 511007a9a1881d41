"""The embedded engine: a transformers causal LM on CPU, no network, the factory's default.

It runs its own decode loop around the model's forward pass instead of `model.generate`, because
the factory needs things `generate` does not give together:

- **Per-request seeds.** Every sample row draws from its own `torch.Generator`, seeded from the
  request's seed and the sample index, so a request's random stream does not depend on its
  neighbours in the batch. What is guaranteed: the same request in the same batch gives the same
  output bit for bit; the same request in a different batch gets the same random numbers, and its
  output differs only if the batch's padded length changes a floating-point rounding enough to
  flip a near-tie (float32: 0 of 18 seeded samples changed between alone and batched; not
  excluded). Matmuls are row-independent; the attention kernels are not length-independent.
- **n samples per request** as n rows (one row, copied, for greedy requests without a schema).
- **Batches grouped by shared prefix and prompt length.** The prefix of a prompt (everything
  before its last message: system prompt, few-shot turns) is computed once per batch and its keys
  and values are kept once, not copied to every row (`prefix_attention.py`: attention over the
  prefix is one matrix product for all rows), so 64 few-shot prompts pay for one ~500-token
  prefix, in the prefill and in every decode step. Each row's tokens
  sit at cache columns equal to their positions (padding after them); the KV cache is
  preallocated and written in place, and finished rows are dropped from the batch as they
  finish, so short answers do not pay for long ones.
- **Stop strings**: the text is cut at the first stop string and the finish reason is "stop".
- **JSON-schema requests** are decoded under a token mask from llguidance (constrained decoding)
  when it is installed, and always validated with `jsonschema` afterwards. A completion that
  fails validation (e.g. cut by max_tokens) is retried with a fresh seed up to `json_retries`
  times; after that the response carries `error` and keeps the raw text.

Prompts go through the model's chat template.

Precision and threads (`infra/engines/cpu.py`): `dtype="auto"` loads the model in bfloat16 where
the CPU computes bf16 natively (AVX512_BF16 or AMX flags), about twice as fast as float32 there,
and in float32 everywhere else (emulated bf16 is about three times slower than float32). bf16
rounding can make a seeded sample depend on its batch's padded length (the attention kernels sum
a row differently); float32 keeps seeded samples identical alone and in any batch. `identity`
names the precision when it is not float32, so cached responses of one precision are never served
for another. `num_threads=None` uses the CPUs the process may run on (affinity), and one thread
when the load average says they are oversubscribed (every small matmul would wait a scheduler
slice for the second thread), decided again at every `generate` call (torch's thread count is
process-wide: this engine is the process's heavy torch user).
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
from infra.engines.cpu import (
    choose_dtype,
    contended_threads,
    log_choice_once,
    read_cpu_info,
    usable_cpus,
)
from infra.engines.prefix_attention import Cursor as _Cursor
from infra.engines.prefix_attention import PrefixLayer as _PreallocatedLayer
from infra.engines.prefix_attention import active_cache
from infra.engines.prefix_attention import register as register_prefix_attention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A shared prefix (system prompt + few-shot turns) shorter than this is not computed separately.
MIN_SHARED_PREFIX = 32
# A prefix group smaller than this share of a batch is not decoded on its own: its rows join the
# other small groups in batches that share no prefix (each row's whole prompt is its suffix). A
# decode step costs about the same for 2 rows as for 16, so four groups of two decoded one after
# another took four times one batch of eight (evolve: one few-shot template per operation).
MIN_GROUP_SHARE = 0.25
# Candidates sorted for top-p sampling before falling back to sorting the whole vocabulary.
TOP_P_CANDIDATES = 512


def auto_threads(others: float | None = None, cpus: int | None = None) -> int:
    """The CPUs this process may use (affinity), or 1 when other processes keep half a core
    busy (`infra.engines.cpu.contended_threads`)."""
    return contended_threads(cpus, others)


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
    prefix: int
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
        if dtype not in ("auto", *DTYPES):
            raise ValueError(
                f"embedded engine dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}"
            )
        cpu = read_cpu_info()
        dtype, why = choose_dtype(dtype, cpu)
        # None: decided again at every `generate` call, as the machine's load changes.
        self._auto_threads = num_threads is None
        if num_threads:
            torch.set_num_threads(num_threads)
        self._pick_threads()
        log_choice_once(
            "embedded",
            f"embedded engine: torch {dtype} ({why}) on {cpu.model}, "
            f"{'auto' if self._auto_threads else num_threads} threads of {usable_cpus()} usable",
        )
        self.dtype = dtype
        self.batch_size = batch_size
        self.json_retries = json_retries
        # float32 is the reference precision; any other changes outputs, so it is named.
        self._identity = resolved.identity + ("" if dtype == "float32" else f"+torch-{dtype}")
        self.tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        self.model = AutoModelForCausalLM.from_pretrained(
            resolved.path, dtype=DTYPES[dtype], attn_implementation=register_prefix_attention()
        )
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
            self._pick_threads()
            return self._generate(requests)

    @property
    def num_threads(self) -> int:
        return torch.get_num_threads()

    # -- internals --------------------------------------------------------------------------

    def _pick_threads(self) -> None:
        if self._auto_threads:
            torch.set_num_threads(auto_threads())

    def _generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
        start = time.perf_counter()
        prompts: list[tuple[list[int], int] | None] = []
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
            for batch, shared in self._batches(pending):
                self._decode(batch, requests, shared)
            retry = []
            for row in pending:
                schema = requests[row.request].json_schema
                invalid = schema is not None and schema_error(row.text, schema) is not None
                if invalid and row.attempt < self.json_retries:
                    request = requests[row.request]
                    retry.append(
                        self._new_row(
                            row.request,
                            row.sample,
                            row.attempt + 1,
                            (row.prompt, row.prefix),
                            request,
                        )
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
                    prompt_tokens=len(prompts[i][0]),
                    latency_s=max(r.done_at for r in got) - start,
                    error=error,
                )
            )
        return responses

    def _encode(self, request: ChatRequest) -> tuple[list[int], int]:
        """The prompt's token ids, and how many of them form its shareable prefix.

        The prefix is everything before the last message (system prompt, few-shot turns): it
        depends on the request alone, never on its batch, so a request is always split at the
        same place and its prefix keys/values are always computed the same way.
        """
        if request.raw:
            return list(self.tokenizer(request.prompt)["input_ids"]), 0
        messages = list(request.messages)
        ids = list(
            self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        prefix = 0
        if len(messages) > 1:
            head = self.tokenizer.apply_chat_template(
                messages[:-1], add_generation_prompt=False, tokenize=True, return_dict=True
            )["input_ids"]
            prefix = _common_prefix(ids, list(head))
        # Short prefixes are not worth a forward pass of their own; at least one token must stay
        # in the suffix, whose last position gives the first logits.
        if prefix < MIN_SHARED_PREFIX:
            prefix = 0
        return ids, min(prefix, len(ids) - 1)

    def _new_row(self, request: int, sample: int, attempt: int, prompt, req: ChatRequest) -> _Row:
        generator = None
        if req.sampling.temperature > 0:
            generator = torch.Generator().manual_seed(row_seed(req.sampling.seed, sample, attempt))
        matcher = None
        if req.json_schema is not None and self._constrained:
            matcher = self._matcher(req.json_schema)
        ids, prefix = prompt
        return _Row(request, sample, attempt, ids, prefix, generator, matcher)

    def _batches(self, rows: list[_Row]) -> list[tuple[list[_Row], int]]:
        """(rows, shared prefix length) per batch. Rows sharing a prefix are batched together
        (the prefix is computed once per batch); groups too small to fill a useful share of a
        batch are pooled into batches without a shared prefix. Within a batch, longest prompts
        first, so each batch holds similar lengths."""
        groups: dict[tuple[int, ...], list[_Row]] = {}
        for row in rows:
            groups.setdefault(tuple(row.prompt[: row.prefix]), []).append(row)
        size = self.batch_size
        small = max(2, int(size * MIN_GROUP_SHARE))
        batches: list[tuple[list[_Row], int]] = []
        pooled: list[_Row] = []
        for prefix, group in groups.items():
            if len(group) < small and len(groups) > 1:
                pooled.extend(group)
                continue
            ordered = sorted(group, key=lambda r: -len(r.prompt))
            batches.extend(
                (ordered[i : i + size], len(prefix)) for i in range(0, len(ordered), size)
            )
        ordered = sorted(pooled, key=lambda r: -len(r.prompt))
        batches.extend((ordered[i : i + size], 0) for i in range(0, len(ordered), size))
        return batches

    def _decode(self, batch: list[_Row], requests: list[ChatRequest], shared: int) -> None:
        from transformers.cache_utils import Cache

        sampling = [requests[r.request].sampling for r in batch]
        steps = max(s.max_tokens for s in sampling)
        # `shared`: the prefix length every row of the batch shares (0: none; see _batches)
        suffixes = [r.prompt[shared:] for r in batch]
        width = max(len(s) for s in suffixes)
        rows = len(batch)
        # Every row's prompt starts at cache column 0 and its own tokens follow it directly
        # (column == position), padding sits after them: a row's keys lie at the same columns
        # whatever its batch, so attention adds up the same numbers in the same order and the
        # output does not depend on the neighbours (bf16 included). Keys, values and the mask
        # are preallocated, each step writes one column per row in place.
        capacity = shared + width + steps
        cursor = _Cursor()
        layers = self.model.config.num_hidden_layers
        cache = Cache(layers=[_PreallocatedLayer(capacity, cursor) for _ in range(layers)])
        valid = torch.zeros((rows, capacity), dtype=torch.bool)
        if shared:
            prefix = torch.tensor(batch[0].prompt[:shared]).unsqueeze(0)
            self.model(
                input_ids=prefix,
                position_ids=torch.arange(shared).unsqueeze(0),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            # The prefix's keys and values stay one row; `prefix_attention` reads them for all.
            for layer in cache.layers:
                layer.share_prefix(rows)
            valid[:, :shared] = True
        input_ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        ends = torch.empty(rows, dtype=torch.long)
        for k, suffix in enumerate(suffixes):
            input_ids[k, : len(suffix)] = torch.tensor(suffix)
            valid[k, shared : shared + len(suffix)] = True
            ends[k] = shared + len(suffix) - 1
        columns = torch.arange(shared, shared + width)
        causal = columns.unsqueeze(1) >= torch.arange(shared + width).unsqueeze(0)
        with active_cache(cache):
            hidden = self.model.get_decoder()(
                input_ids=input_ids,
                attention_mask=(causal.unsqueeze(0) & valid[:, None, : shared + width]).unsqueeze(
                    1
                ),
                position_ids=columns.expand(rows, width),
                cache=cache,
                use_cache=True,
            ).last_hidden_state
        # Each row's first logits come from its last prompt token, not the batch's last column;
        # only those go through the output layer (49k words: a fifth of this model's weights).
        last = hidden[torch.arange(rows), ends - shared]
        logits = self.model.get_output_embeddings()(last)[:, : self._vocab].float()
        positions = ends + 1
        kv_length = shared + width  # columns in use; a step may add one
        active = list(range(rows))
        for _ in range(steps):
            next_tokens = self._sample(
                logits, [batch[k] for k in active], [sampling[k] for k in active]
            )
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
                valid = valid[index]
                positions = positions[index]
                next_tokens = [next_tokens[p] for p in keep]
                active = [active[p] for p in keep]
            valid[torch.arange(len(active)), positions] = True
            kv_length = max(kv_length, int(positions.max()) + 1)
            cursor.positions = positions
            cursor.length = kv_length
            with active_cache(cache):
                out = self.model(
                    input_ids=torch.tensor(next_tokens).unsqueeze(1),
                    attention_mask=valid[:, None, None, :kv_length],
                    position_ids=positions.unsqueeze(1),
                    cache=cache,
                    use_cache=True,
                )
            logits = out.logits[:, -1, : self._vocab].float()
            positions = positions + 1
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
        if sampling.stop and _stop_in_tail(self._text, row.tokens, sampling.stop):
            # The tail holds a stop string: this is the first step it appears, so the first
            # occurrence in the full text is the one to cut at.
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
        # Greedy rows need only the argmax; sampled rows get one softmax for all of them (rows
        # are independent in it), then each draws from its own generator.
        tokens = logits.argmax(dim=-1).tolist()
        drawn = [k for k, row in enumerate(rows) if row.generator is not None]
        if not drawn:
            return tokens
        temperature = torch.tensor([sampling[k].temperature for k in drawn], dtype=logits.dtype)
        probs = torch.softmax(logits[drawn] / temperature.unsqueeze(1), dim=-1)
        for j, k in enumerate(drawn):
            row_probs = _top_p(probs[j], sampling[k].top_p)
            tokens[k] = int(torch.multinomial(row_probs, 1, generator=rows[k].generator))
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


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _stop_in_tail(decode, tokens: list[int], stops) -> bool:
    """Whether a stop string appears in the text of the last few tokens.

    Decoding the whole completion every step costs O(n^2) over a completion; a stop string that
    completes with the newest token lies within its last `4 * len(stop) + 8` tokens (a token is
    at least one character, or a quarter of a UTF-8 character as a byte token).
    """
    window = 4 * max(len(s) for s in stops) + 8
    tail = decode(tokens[-window:])
    return any(s and s in tail for s in stops)


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """`probs` restricted to the smallest most-likely set whose mass reaches `top_p`."""
    if top_p >= 1.0:
        return probs
    # A full sort of the 49k-word vocabulary per row per step is slow; the nucleus almost always
    # lies in the top few hundred, so sort those and fall back to the full sort when it does not.
    k = min(TOP_P_CANDIDATES, probs.shape[0])
    sorted_probs, order = torch.topk(probs, k)
    if float(sorted_probs.sum()) < top_p:
        sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = sorted_probs.cumsum(-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    drop = cumulative - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)
