"""A tiny causal LM (2 layers, 32 wide) with a byte-level BPE tokenizer trained on math text:
the trainers' plumbing (datasets, collators, checkpoints, resume, rewards) runs in seconds with
it. Learning itself is tested on the embedded SmolLM2-135M (marked slow)."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nWhat is 2 + 3?\n\n### Response: Let's think "
    "step by step.\nStep 1: 2 + 3 = 5.\nThe answer is: 5",
    "Judge the evolved instruction below: is it well defined, precise and complete, and does it "
    "ask for one answer that can be worked out?\n\n### Original instruction:\nA farmer has 12 "
    "apples and gives away 5. How many are left?\n\n### Evolved instruction:\n",
    "Let's write a program.\n```python\nprint(12 - 5)\n```\n0123456789 + - * / = ( ) $ ?",
    "Tom buys 4 pens at 3 dollars each. How much does he pay? 4 * 3 = 12. He pays 12 dollars.",
]


def make_tiny_model(folder: Path) -> Path:
    """Write a random tiny Llama + tokenizer into `folder` (loadable by every Auto class)."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS * 20, vocab_size=400, min_frequency=1, special_tokens=["<pad>", "<s>", "</s>"]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
