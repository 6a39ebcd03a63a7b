"""Tiny models and a character tokenizer built in code: for tests, examples and the embedded default.

Nothing here downloads anything. The character tokenizer is the one the embedded default model ships with.
"""

from __future__ import annotations

from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def make_char_tokenizer(chat_template: bool = True):
    """A character-level fast tokenizer over printable ASCII + newline, with a chat template.

    `<|end|>` closes every turn and is the EOS token, so generation stops at the end of the assistant turn.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|end|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[2:5]})
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(
    arch: str = "llama",
    vocab_size: int = 102,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 64,
    max_positions: int = 256,
    seed: int = 0,
    **overrides: Any,
):
    """A randomly initialised causal LM of the given architecture (llama, qwen2, gpt2, gpt_neox), in eval mode."""
    import torch
    import transformers as tf

    common = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=SPECIAL_TOKENS.index("<|end|>"))
    if arch == "llama":
        config = tf.LlamaConfig(
            hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=num_heads, intermediate_size=intermediate_size,
            max_position_embeddings=max_positions, tie_word_embeddings=False, **common,
        )
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        config = tf.Qwen2Config(
            hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            num_key_value_heads=max(1, num_heads // 2), intermediate_size=intermediate_size,
            max_position_embeddings=max_positions, tie_word_embeddings=False, **common,
        )
        cls = tf.Qwen2ForCausalLM
    elif arch == "gpt2":
        config = tf.GPT2Config(
            n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_inner=intermediate_size,
            n_positions=max_positions, bos_token_id=common["eos_token_id"], **common,
        )
        cls = tf.GPT2LMHeadModel
    elif arch == "gpt_neox":
        config = tf.GPTNeoXConfig(
            hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
            intermediate_size=intermediate_size, max_position_embeddings=max_positions,
            bos_token_id=common["eos_token_id"], **common,
        )
        cls = tf.GPTNeoXForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}: use llama, qwen2, gpt2 or gpt_neox")
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = cls(config)
    model.eval()
    return model


def save_tiny_model(path, arch: str = "llama", seed: int = 0, **kwargs: Any) -> str:
    """Build a tiny model + char tokenizer and save both as a HF directory at `path`. Returns the path."""
    tokenizer = make_char_tokenizer()
    model = make_tiny_model(arch=arch, vocab_size=len(tokenizer), seed=seed, **kwargs)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)
