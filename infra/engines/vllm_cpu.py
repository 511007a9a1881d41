"""vLLM's CPU build: the scheduler settings it needs to run seeded requests.

vLLM 0.32's CPU build dies ("CPU Generator does not use offset") whenever it has to rewind a
seeded request's random generator, which a CPU `torch.Generator` cannot do. Two things rewind it:
resuming a *preempted* request, and a *partial prefill* (chunked prefill: a prompt's tokens split
over two steps, the token sampled after the first part discarded; `_bookkeeping_sync` in
`gpu_model_runner.py`). Every request of the factory is seeded, so on a CPU the engine runs no
more sequences than its KV cache holds at full length (no preemption) and prefills every prompt
in one step (chunked prefill off, a step's token budget at least one full context).

Imported by the in-process engine (`infra.engines.vllm_engine`) and by the worker and server
launcher in vLLM's own environment (`infra.engines.vllm_worker`), which build `vllm.LLM` with
the same `llm_options`; it imports nothing of the factory's, so either side can use it.
"""

from __future__ import annotations

import functools
import os
from typing import Any


def kv_cache_gib() -> float:
    return float(os.environ.get("VLLM_CPU_KVCACHE_SPACE") or 1)


def llm_options(options: dict[str, Any], device: str) -> dict[str, Any]:
    """The `vllm.LLM` keyword arguments for `device` (the worker's and the in-process engine's):
    on a CPU eager unless configured otherwise, no GPU memory share, and `cpu_options`; unset
    options (compiled or eager on a GPU among them) left to vLLM."""
    options = dict(options)
    if device == "cpu":
        if options.get("enforce_eager") is None:
            options["enforce_eager"] = True
        options.pop("gpu_memory_utilization", None)
        options.update(cpu_options(options, kv_cache_gib()))
    return {k: v for k, v in options.items() if v is not None}


def cpu_options(options: dict[str, Any], kv_gib: float) -> dict[str, Any]:
    """The `vllm.LLM` settings a CPU run of seeded requests needs (an explicit `max_num_seqs`
    or `max_num_batched_tokens` in `options` wins): see the module's docstring."""
    extra: dict[str, Any] = {"enable_chunked_prefill": False}
    if options.get("max_num_seqs") is None:
        extra["max_num_seqs"] = cpu_max_num_seqs(options, kv_gib)
    if options.get("max_num_batched_tokens") is None:
        # vLLM's own CPU default budget is 4,096 tokens a step (2,048 served); never less than
        # one whole prompt, or a prompt longer than the budget could never be scheduled.
        extra["max_num_batched_tokens"] = max(model_length(options) or 0, 4096)
    return {k: v for k, v in extra.items() if v is not None}


@functools.cache
def _model_config(model: str) -> Any:
    """The model's transformers config, read once per process (both settings above need it)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model)


def model_length(options: dict[str, Any]) -> int | None:
    """`max_model_len`, else the model's context length (None when its config does not say)."""
    if options.get("max_model_len"):
        return int(options["max_model_len"])
    try:
        return int(_model_config(options["model"]).get_text_config().max_position_embeddings)
    except Exception:
        return None


def cpu_max_num_seqs(options: dict[str, Any], kv_gib: float) -> int | None:
    """As many sequences at once as the KV cache holds at full length (`max_model_len`), so vLLM
    never preempts one on a CPU.

    vLLM 0.32's CPU build cannot resume a preempted *seeded* request: recomputing it rewinds the
    request's generator (`gen.set_offset(...)` in `gpu_model_runner.py`), and a CPU
    `torch.Generator` has no offset ("CPU Generator does not use offset"), which kills the engine
    core. Every request of the factory is seeded, and a KV cache of a few GiB fills quickly (1 GiB
    is 23k tokens of SmolLM2-135M in float32: 40 seeded prompts of ~1,650 tokens killed it, 11 at a
    time ran). None when the model's config does not say its KV size (vLLM's default then)."""
    try:
        config = _model_config(options["model"])
        text = config.get_text_config()
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        layers = text.num_hidden_layers
        length = model_length(options) or text.max_position_embeddings
    except Exception as exc:  # an unusual config: leave vLLM's default, say so in the log
        print(f"evolforge: KV size of {options.get('model')} unknown ({exc})", flush=True)
        return None
    dtype = options.get("dtype") or "auto"
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", "float32"))
    width = 4 if "float32" in dtype else 2
    per_token = 2 * layers * kv_heads * head_dim * width  # keys and values, every layer
    seqs = max(1, int(kv_gib * 2**30) // per_token // int(length))
    print(f"evolforge: max_num_seqs {seqs} ({kv_gib:g} GiB KV cache, {length} tokens)", flush=True)
    return seqs
