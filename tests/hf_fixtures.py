"""Tiny random HF models of every supported family, built with transformers' PyTorch classes and a
tokenizer trained locally with `tokenizers` (no downloads). Shared by the model, generation and export tests."""

from __future__ import annotations


import numpy as np

VOCAB = 96
CORPUS = ["the quick brown fox jumps over the lazy dog", "jax and flax train language models",
          "reinforcement learning from human feedback", "1+2=3 4+5=9 hello world"] * 4


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60])
    tok.train_from_iterator(CORPUS, trainer)
    from tokenizers import decoders
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")


def hf_config(family: str, **over):
    from transformers import AutoConfig

    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if family in ("llama", "mistral", "qwen2"):
        kw = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
        if family == "llama":
            kw.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                      "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
        if family == "mistral":
            kw.update(sliding_window=4096)
        if family == "qwen2":
            kw.update(tie_word_embeddings=True)
    elif family == "opt":
        kw = dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, word_embed_proj_dim=32, do_layer_norm_before=False)
        common["pad_token_id"] = 1
    elif family == "gpt2":
        kw = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)
    else:
        raise ValueError(family)
    kw.update(common)
    kw.update(over)
    return AutoConfig.for_model(family, **kw)


def make_hf_model(family: str, directory: str, *, seed: int = 0, score: bool = False, **over):
    """Saves a random tiny HF model (and the tokenizer) to `directory`; returns the torch model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = hf_config(family, **over)
    if score:
        cfg.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(cfg)
    else:
        model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a mapping slip shows in the logits
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    make_tokenizer().save_pretrained(directory)
    return model


def padded_batch():
    """A left-padded batch of 3 prompts of different lengths: (ids, mask) int64 numpy."""
    rng = np.random.default_rng(0)
    lengths = [9, 5, 2]
    t = max(lengths)
    ids = np.zeros((3, t), np.int64)
    mask = np.zeros((3, t), np.int64)
    for i, n in enumerate(lengths):
        ids[i, t - n:] = rng.integers(4, VOCAB, size=n)
        mask[i, t - n:] = 1
    return ids, mask


def torch_logits(model, ids, mask):
    """HF logits with positions counted over real tokens (what jaxrl does for left padding)."""
    import torch

    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    kwargs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    if model.config.model_type != "opt":  # OPT computes positions from the mask itself
        kwargs["position_ids"] = torch.tensor(pos)
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


def jaxrl_logits(model, ids, mask):
    """jaxrl's logits of a numpy batch, as numpy."""
    import jax.numpy as jnp

    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))


def rel_diff(out, ref, mask) -> float:
    """max |out - ref| / max |ref| over the real tokens."""
    m = mask.astype(bool)
    return float(np.abs(out - ref)[m].max() / np.abs(ref[m]).max())


FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt2")
