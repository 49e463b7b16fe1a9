"""Tiny random-initialised models of every supported family, built from configs in code.

They have no knowledge to lose; they exist so tests can run every method on every architecture
in seconds. ``tiny_tokenizer`` is a byte-level BPE (vocabulary 512) trained on a few hundred
standard-library docstrings, shared by all tiny models.
"""

from __future__ import annotations

import functools

import torch

from slimformer.models.loading import LoadedModel, from_module

TINY_FAMILIES = ("bert", "llama", "qwen2", "gpt2")
TINY_VOCAB = 512


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` (byte-level BPE, 512 tokens) trained offline in ~1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slimformer.data import TextSpec, load_texts

    texts = load_texts(TextSpec(source="stdlib-docs", split="calibration", n=400, seed=1234))
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_config(family: str):
    """Config of a tiny model: width 64, 4 layers, 4 heads (2 KV heads where the family has GQA)."""
    import transformers

    common = dict(vocab_size=TINY_VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "bert":
        return transformers.BertConfig(
            hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common,
        )
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=False, **common,
        )
    if family == "qwen2":
        return transformers.Qwen2Config(
            hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=True, **common,
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=64, n_layer=4, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            **common,
        )
    raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES}")


def tiny_model(family: str, seed: int = 0) -> LoadedModel:
    """A tiny random model of ``family`` with the tiny tokenizer, ready for slimformer."""
    import transformers

    config = tiny_config(family)
    torch.manual_seed(seed)
    if family == "bert":
        model = transformers.BertModel(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    return from_module(model, tiny_tokenizer(), source=f"tiny-{family}")
