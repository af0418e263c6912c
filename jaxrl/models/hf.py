"""Hugging Face checkpoints in and out: `load_pretrained(path)` and `save_pretrained(model, path)`.

One declarative table per family maps HF tensor names to jaxrl parameter paths ({i} = layer index),
with a transform: 'T' transposes a torch Linear weight [out, in] to our kernel [in, out]; 'split3'
cuts GPT-2's fused c_attn into q, k, v; 'Tsplit' cuts a fused torch Linear (Phi-3's qkv_proj,
gate_up_proj) into its parts by rows (each part as wide as its kernel), transposed. Every tensor's shape is
checked against the model's.
Per-layer tensors (`layers.{i}.X`) go into, and come out of, row i of the stacked parameter `layers.X`
(leading layer axis L; see jaxrl.models.transformer).
Safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from jaxrl.errors import JaxrlError
from jaxrl.io import check_json_files, read_json
from jaxrl.models.config import ModelConfig
from jaxrl.models.lora import has_lora, merge_lora
from jaxrl.models.safetensors_io import REFETCH, TensorStore
from jaxrl.models.transformer import ScoreModel, Transformer, store_params
from jaxrl.parallel.mesh import to_host
from jaxrl.parallel.sharding import ModelShardings

log = logging.getLogger(__name__)

_LLAMA = [
    ("model.embed_tokens.weight", "embed.embedding", None),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.scale", None),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q.kernel", "T"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.k.kernel", "T"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.v.kernel", "T"),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.attn.q.bias", None),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.attn.k.bias", None),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.attn.v.bias", None),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o.kernel", "T"),
    ("model.layers.{i}.self_attn.o_proj.bias", "layers.{i}.attn.o.bias", None),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.scale", None),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate.kernel", "T"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up.kernel", "T"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down.kernel", "T"),
    ("model.layers.{i}.mlp.gate_proj.bias", "layers.{i}.mlp.gate.bias", None),
    ("model.layers.{i}.mlp.up_proj.bias", "layers.{i}.mlp.up.bias", None),
    ("model.layers.{i}.mlp.down_proj.bias", "layers.{i}.mlp.down.bias", None),
    ("model.norm.weight", "final_norm.scale", None),
]
# Gemma 2: Llama's projections, four norms per block, all zero-centred (see Norm's offset); embeddings tied.
_GEMMA2 = [row for row in _LLAMA if ".post_attention_layernorm." not in row[0]] + [
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.attn_post_norm.scale", None),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "layers.{i}.mlp_norm.scale", None),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.mlp_post_norm.scale", None),
]
# Gemma 3 (text): Gemma 2's plus RMSNorm over each head's queries and keys.
_GEMMA3 = _GEMMA2 + [
    ("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attn.q_norm.scale", None),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attn.k_norm.scale", None),
]
_OPT = [
    ("model.decoder.embed_tokens.weight", "embed.embedding", None),
    ("model.decoder.embed_positions.weight", "pos_embed.embedding", None),
    ("model.decoder.project_in.weight", "project_in.kernel", "T"),
    ("model.decoder.project_out.weight", "project_out.kernel", "T"),
    ("model.decoder.layers.{i}.self_attn_layer_norm.weight", "layers.{i}.attn_norm.scale", None),
    ("model.decoder.layers.{i}.self_attn_layer_norm.bias", "layers.{i}.attn_norm.bias", None),
    ("model.decoder.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q.kernel", "T"),
    ("model.decoder.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.k.kernel", "T"),
    ("model.decoder.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.v.kernel", "T"),
    ("model.decoder.layers.{i}.self_attn.q_proj.bias", "layers.{i}.attn.q.bias", None),
    ("model.decoder.layers.{i}.self_attn.k_proj.bias", "layers.{i}.attn.k.bias", None),
    ("model.decoder.layers.{i}.self_attn.v_proj.bias", "layers.{i}.attn.v.bias", None),
    ("model.decoder.layers.{i}.self_attn.out_proj.weight", "layers.{i}.attn.o.kernel", "T"),
    ("model.decoder.layers.{i}.self_attn.out_proj.bias", "layers.{i}.attn.o.bias", None),
    ("model.decoder.layers.{i}.final_layer_norm.weight", "layers.{i}.mlp_norm.scale", None),
    ("model.decoder.layers.{i}.final_layer_norm.bias", "layers.{i}.mlp_norm.bias", None),
    ("model.decoder.layers.{i}.fc1.weight", "layers.{i}.mlp.up.kernel", "T"),
    ("model.decoder.layers.{i}.fc1.bias", "layers.{i}.mlp.up.bias", None),
    ("model.decoder.layers.{i}.fc2.weight", "layers.{i}.mlp.down.kernel", "T"),
    ("model.decoder.layers.{i}.fc2.bias", "layers.{i}.mlp.down.bias", None),
    ("model.decoder.final_layer_norm.weight", "final_norm.scale", None),
    ("model.decoder.final_layer_norm.bias", "final_norm.bias", None),
]
_GPT2 = [
    ("transformer.wte.weight", "embed.embedding", None),
    ("transformer.wpe.weight", "pos_embed.embedding", None),
    ("transformer.h.{i}.ln_1.weight", "layers.{i}.attn_norm.scale", None),
    ("transformer.h.{i}.ln_1.bias", "layers.{i}.attn_norm.bias", None),
    # Conv1D weights are already [in, out].
    ("transformer.h.{i}.attn.c_attn.weight", "layers.{i}.attn.{q,k,v}.kernel", "split3"),
    ("transformer.h.{i}.attn.c_attn.bias", "layers.{i}.attn.{q,k,v}.bias", "split3"),
    ("transformer.h.{i}.attn.c_proj.weight", "layers.{i}.attn.o.kernel", None),
    ("transformer.h.{i}.attn.c_proj.bias", "layers.{i}.attn.o.bias", None),
    ("transformer.h.{i}.ln_2.weight", "layers.{i}.mlp_norm.scale", None),
    ("transformer.h.{i}.ln_2.bias", "layers.{i}.mlp_norm.bias", None),
    ("transformer.h.{i}.mlp.c_fc.weight", "layers.{i}.mlp.up.kernel", None),
    ("transformer.h.{i}.mlp.c_fc.bias", "layers.{i}.mlp.up.bias", None),
    ("transformer.h.{i}.mlp.c_proj.weight", "layers.{i}.mlp.down.kernel", None),
    ("transformer.h.{i}.mlp.c_proj.bias", "layers.{i}.mlp.down.bias", None),
    ("transformer.ln_f.weight", "final_norm.scale", None),
    ("transformer.ln_f.bias", "final_norm.bias", None),
]
# Qwen3 and Phi-3.
_QWEN3 = _LLAMA + [
    ("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attn.q_norm.scale", None),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attn.k_norm.scale", None),
]
_PHI3 = [
    ("model.embed_tokens.weight", "embed.embedding", None),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.attn_norm.scale", None),
    ("model.layers.{i}.self_attn.qkv_proj.weight", "layers.{i}.attn.{q,k,v}.kernel", "Tsplit"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o.kernel", "T"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.mlp_norm.scale", None),
    ("model.layers.{i}.mlp.gate_up_proj.weight", "layers.{i}.mlp.{gate,up}.kernel", "Tsplit"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down.kernel", "T"),
    ("model.norm.weight", "final_norm.scale", None),
]
TABLES = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "opt": _OPT, "gpt2": _GPT2, "qwen3": _QWEN3,
          "phi3": _PHI3, "gemma2": _GEMMA2, "gemma3_text": _GEMMA3}
HEADS = [("lm_head.weight", "lm_head.kernel", "T"), ("score.weight", "score.kernel", "T")]
# Buffers some checkpoints carry that are not parameters.
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")

ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
    "opt": ("OPTForCausalLM", "OPTForSequenceClassification"),
    "gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "phi3": ("Phi3ForCausalLM", "Phi3ForSequenceClassification"),
}
# RoPE types each family reads (the rest are refused by name).
_ROPE_TYPES = {"phi3": ("default", "longrope")}
_ROPE_DEFAULT_TYPES = ("default", "linear", "llama3")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")

# Files AutoTokenizer parses as JSON (config.json tells it the tokenizer class).
_TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "config.json")


def check_tokenizer_files(path: str) -> None:
    """After AutoTokenizer failed on `path`: raises a JaxrlError naming a tokenizer file that is corrupt
    or cut short, if one is (transformers itself only passes on a bare JSONDecodeError)."""
    check_json_files(path, _TOKENIZER_JSON, what="tokenizer file",
                     fix="copy the tokenizer files again from the model's source (or tokenizer.save_pretrained)")


# ---------------------------------------------------------------------------------------------- config
def config_from_hf(d: dict) -> ModelConfig:
    """ModelConfig from an HF config.json dict."""
    family = d.get("model_type")
    if family == "gemma3":
        raise JaxrlError(
            "model_type 'gemma3' is the multimodal Gemma3ForConditionalGeneration; jaxrl reads text-only "
            "Gemma 3 (model_type 'gemma3_text', Gemma3ForCausalLM): use a text-only checkpoint (Gemma 3 1B) "
            "or save the language model alone"
        )
    if family not in TABLES:
        raise JaxrlError(
            f"unsupported architecture: model_type {family!r} ({d.get('architectures')}); jaxrl supports "
            f"{sorted(TABLES)}"
        )
    ids = dict(bos_token_id=d.get("bos_token_id"), pad_token_id=d.get("pad_token_id"),
               eos_token_id=tuple(d["eos_token_id"]) if isinstance(d.get("eos_token_id"), list)
               else d.get("eos_token_id"))
    if family == "opt":
        if not d.get("layer_norm_elementwise_affine", True):
            raise JaxrlError("OPT with layer_norm_elementwise_affine=false is not supported")
        pre = d.get("do_layer_norm_before", True)
        return ModelConfig(
            family="opt", vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
            num_kv_heads=d["num_attention_heads"], head_dim=d["hidden_size"] // d["num_attention_heads"],
            intermediate_size=d["ffn_dim"], max_position_embeddings=d["max_position_embeddings"],
            norm="layer", norm_eps=1e-5, activation=_act(d.get("activation_function", "relu")),
            gated_mlp=False, position="learned", position_offset=2, qkv_bias=d.get("enable_bias", True),
            out_bias=d.get("enable_bias", True), mlp_bias=d.get("enable_bias", True), pre_norm=pre,
            final_norm=pre and not d.get("_remove_final_layer_norm", False),
            embed_dim=d.get("word_embed_proj_dim") or d["hidden_size"],
            tie_embeddings=d.get("tie_word_embeddings", True), **ids,
        )
    if family == "gpt2":
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
            raise JaxrlError("GPT-2 with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn is not supported")
        return ModelConfig(
            family="gpt2", vocab_size=d["vocab_size"], hidden_size=d["n_embd"], num_layers=d["n_layer"],
            num_heads=d["n_head"], num_kv_heads=d["n_head"], head_dim=d["n_embd"] // d["n_head"],
            intermediate_size=d.get("n_inner") or 4 * d["n_embd"], max_position_embeddings=d["n_positions"],
            norm="layer", norm_eps=d.get("layer_norm_epsilon", 1e-5),
            activation=_act(d.get("activation_function", "gelu_new")), gated_mlp=False, position="learned",
            qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=d.get("tie_word_embeddings", True),
            **ids,
        )
    if family in ("gemma2", "gemma3_text"):
        return _gemma_config(d, ids)
    rope = dict(d.get("rope_parameters") or {})
    rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    if d.get("rope_scaling"):
        rope.update(d["rope_scaling"])
    theta = rope.pop("rope_theta")
    if rope.get("type") and not rope.get("rope_type"):
        rope["rope_type"] = rope.pop("type")
    rope.pop("type", None)
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    scaling, rotary_dim = _rope_scaling(family, rope, d, head_dim)
    window, layer_types = _sliding_window(family, d)
    return ModelConfig(
        family=family, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        num_layers=d["num_hidden_layers"], num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=head_dim, intermediate_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 2048), norm="rms",
        norm_eps=d.get("rms_norm_eps", 1e-6), activation=_act(d.get("hidden_act", "silu")),
        rope_theta=float(theta), rope_scaling=scaling, rotary_dim=rotary_dim,
        qkv_bias=family == "qwen2" or d.get("attention_bias", False),
        out_bias=family != "qwen2" and d.get("attention_bias", False),
        mlp_bias=d.get("mlp_bias", False), tie_embeddings=d.get("tie_word_embeddings", False),
        sliding_window=window, layer_types=layer_types, qk_norm=family == "qwen3", **ids,
    )


def _rope_scaling(family, rope: dict, d: dict, head_dim: int):
    """(ModelConfig.rope_scaling, rotary_dim) from the rope parameters less theta; refuses, by key, what
    the family's decoder does not implement."""
    partial = rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    rotary_dim = 0
    if partial != 1.0:
        if family != "phi3":
            raise JaxrlError(f"partial_rotary_factor {partial} is not supported for model_type {family!r} "
                             "(only phi3 rotates part of each head)")
        rotary_dim = int(head_dim * partial)
    if rope.get("rope_type") == "su":  # Phi-3's first name for LongRoPE (transformers reads it so too)
        rope["rope_type"] = "longrope"
    kind = rope.get("rope_type", "default")
    allowed = _ROPE_TYPES.get(family, _ROPE_DEFAULT_TYPES)
    if kind not in allowed:
        raise JaxrlError(f"rope_scaling.rope_type {kind!r} is not supported for model_type {family!r} "
                         f"(supported: {', '.join(allowed)})")
    if kind == "default":
        return None, rotary_dim
    if kind == "longrope":
        rope.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings"))
        width = (rotary_dim or head_dim) // 2
        for key in ("short_factor", "long_factor", "original_max_position_embeddings"):
            if rope.get(key) is None:
                raise JaxrlError(f"rope_scaling.{key} is missing: a longrope model needs it")
        for key in ("short_factor", "long_factor"):
            if len(rope[key]) != width:
                raise JaxrlError(f"rope_scaling.{key} has {len(rope[key])} entries, expected {width} "
                                 "(half the rotated features of a head)")
            rope[key] = tuple(float(x) for x in rope[key])  # hashable: ModelConfig is a static argument
    return tuple(sorted(rope.items())), rotary_dim


def _sliding_window(family, d: dict) -> tuple[int, tuple[str, ...]]:
    """(the attention window, which layers use it: `layer_types`, () = every layer) for the Llama-style
    families. Qwen2/Qwen3 slide only with `use_sliding_window`, on the layers `layer_types` names (by
    default those from `max_window_layers` on, as transformers builds them)."""
    window = d.get("sliding_window") or 0
    if family not in ("qwen2", "qwen3"):
        return window, ()
    if not (window and d.get("use_sliding_window", False)):
        return 0, ()
    types = tuple(d.get("layer_types") or [
        "sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
        for i in range(d["num_hidden_layers"])])
    if set(types) == {"full_attention"}:
        return 0, ()
    return window, (() if set(types) == {"sliding_attention"} else types)


def _rope(params: dict, key: str = "rope_parameters") -> tuple[float, tuple | None]:
    """(theta, scaling) from one HF rope_parameters dict (theta included); refuses a RoPE type we lack."""
    rope = dict(params)
    theta = rope.pop("rope_theta")
    if rope.get("type") and not rope.get("rope_type"):
        rope["rope_type"] = rope.pop("type")
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "linear", "llama3"):
        raise JaxrlError(f"{key}: rope_type {kind!r} is not supported (supported: default, linear, llama3)")
    return float(theta), (tuple(sorted(rope.items())) if kind != "default" else None)


def _gemma_config(d: dict, ids: dict) -> ModelConfig:
    """Gemma 2 and Gemma 3 (text): config.json as transformers 5 writes it (rope_parameters, layer_types)
    or as the Hub's older files do (rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern)."""
    family, layers = d["model_type"], d["num_hidden_layers"]
    if d.get("use_bidirectional_attention"):
        raise JaxrlError(f"{family}: use_bidirectional_attention=true (an encoder variant) is not supported; "
                         "jaxrl's decoder is causal")
    types = d.get("layer_types")
    if not types:  # Gemma 2 alternates from a sliding layer; Gemma 3's pattern is every 6th layer global
        pattern = 2 if family == "gemma2" else d.get("sliding_window_pattern", 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    rope = d.get("rope_parameters") or {}
    if family == "gemma3_text" and ("full_attention" in rope or "sliding_attention" in rope):
        full, local = dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
    else:
        full = {"rope_theta": d.get("rope_theta", 10000.0 if family == "gemma2" else 1e6), **rope,
                **(d.get("rope_scaling") or {})}
        local = {"rope_theta": d.get("rope_local_base_freq", 10000.0)} if family == "gemma3_text" else {}
    full.setdefault("rope_theta", 1e6)
    theta, scaling = _rope(full, "rope_parameters.full_attention" if local else "rope_parameters")
    local_theta, local_scaling = _rope({"rope_theta": 10000.0, **local}, "rope_parameters.sliding_attention") \
        if local else (0.0, None)
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    bias = d.get("attention_bias", False)
    return ModelConfig(
        family=family, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=layers,
        num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads, head_dim=head_dim,
        intermediate_size=d["intermediate_size"], max_position_embeddings=d.get("max_position_embeddings", 8192),
        norm="rms", norm_eps=d.get("rms_norm_eps", 1e-6),
        activation=_act(d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"),
        rope_theta=theta, rope_scaling=scaling, qkv_bias=bias, out_bias=bias,
        tie_embeddings=d.get("tie_word_embeddings", True), sliding_window=d.get("sliding_window") or 0,
        qk_norm=family == "gemma3_text", norm_offset=1.0, scale_embeddings=True, post_norms=True,
        query_pre_attn_scalar=int(d.get("query_pre_attn_scalar") or head_dim),
        attn_softcap=float(d.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(d.get("final_logit_softcapping") or 0.0), layer_types=tuple(types),
        rope_local_theta=local_theta, rope_local_scaling=local_scaling, **ids,
    )


def _act(name):
    table = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu_new": "gelu_new",
             "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu"}
    if name not in table:
        raise JaxrlError(f"activation {name!r} is not supported (supported: {sorted(table)})")
    return table[name]


def config_to_hf(cfg: ModelConfig, *, score: bool = False) -> dict:
    """An HF config.json dict (through transformers' own config class, so every default is present)."""
    from transformers import AutoConfig

    ids = dict(bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id,
               eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id,
               tie_word_embeddings=cfg.tie_embeddings)
    if cfg.family in ("gemma2", "gemma3_text"):
        kw = _gemma_to_hf(cfg)
    elif cfg.family == "opt":
        kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, ffn_dim=cfg.intermediate_size,
                  max_position_embeddings=cfg.max_position_embeddings, activation_function=cfg.activation,
                  do_layer_norm_before=cfg.pre_norm, word_embed_proj_dim=cfg.embed_width,
                  enable_bias=cfg.qkv_bias, _remove_final_layer_norm=cfg.pre_norm and not cfg.final_norm)
    elif cfg.family == "gpt2":
        kw = dict(vocab_size=cfg.vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers,
                  n_head=cfg.num_heads, n_inner=cfg.intermediate_size, n_positions=cfg.max_position_embeddings,
                  layer_norm_epsilon=cfg.norm_eps, activation_function=cfg.activation)
    else:
        rope = {"rope_type": "default", **{k: list(v) if isinstance(v, tuple) else v
                                           for k, v in (cfg.rope_scaling or ())}, "rope_theta": cfg.rope_theta}
        if cfg.rotary_dim:
            rope["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
        kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
                  max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
                  hidden_act=cfg.activation, rope_parameters=rope, rope_theta=cfg.rope_theta,
                  rope_scaling=None if cfg.rope_scaling is None else rope)
        if cfg.family == "llama":
            kw.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
        if cfg.family == "mistral":
            kw.update(sliding_window=cfg.sliding_window or None)
        if cfg.family in ("qwen2", "qwen3"):  # which layers slide: layer_types (max_window_layers 0: all)
            kw.update(use_sliding_window=bool(cfg.sliding_window), sliding_window=cfg.sliding_window or None,
                      max_window_layers=0)
            if cfg.sliding_window:
                kw.update(layer_types=["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers])
        if cfg.family == "qwen3":
            kw.update(attention_bias=cfg.qkv_bias)
        if cfg.family == "phi3":
            kw.update(sliding_window=cfg.sliding_window or None)
            if rope.get("rope_type") == "longrope":
                kw.update(original_max_position_embeddings=rope["original_max_position_embeddings"])
    hf = AutoConfig.for_model(cfg.family, **kw, **ids)
    hf.architectures = [ARCHITECTURES[cfg.family][1 if score else 0]]
    if score:
        hf.num_labels = 1
    return hf.to_dict()


def _gemma_to_hf(cfg: ModelConfig) -> dict:
    """Gemma 2 / Gemma 3 text config keys in transformers 5's format (a None soft-cap is off)."""
    rope = lambda theta, scaling: {"rope_type": "default", **dict(scaling or ()), "rope_theta": theta}  # noqa: E731
    if cfg.family == "gemma3_text":
        rope_parameters = {"full_attention": rope(cfg.rope_theta, cfg.rope_scaling),
                           "sliding_attention": rope(cfg.rope_local_theta or cfg.rope_theta,
                                                     cfg.rope_local_scaling if cfg.rope_local_theta
                                                     else cfg.rope_scaling)}
    else:
        rope_parameters = rope(cfg.rope_theta, cfg.rope_scaling)
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
                rms_norm_eps=cfg.norm_eps, hidden_activation={"gelu_new": "gelu_pytorch_tanh"}.get(
                    cfg.activation, cfg.activation),
                query_pre_attn_scalar=cfg.query_pre_attn_scalar, attention_bias=cfg.qkv_bias,
                sliding_window=cfg.sliding_window or None, layer_types=list(cfg.layer_types),
                attn_logit_softcapping=cfg.attn_softcap or None, final_logit_softcapping=cfg.final_softcap or None,
                rope_parameters=rope_parameters)


# ------------------------------------------------------------------------------------------- mapping
def _expand(cfg: ModelConfig, *, score: bool):
    """(hf_names, our_path, transform, part) for every parameter of this model: `hf_names` is one name,
    or for a stacked per-layer parameter the list of its L per-layer names (row i = layer i)."""
    rows = []
    table = TABLES[cfg.family] + [HEADS[1] if score else HEADS[0]]
    for hf, ours, fn in table:
        names = [hf.format(i=i) for i in range(cfg.num_layers)] if "{i}" in hf else hf
        ours = ours.replace("layers.{i}.", "layers.")
        if fn == "split3":
            for part, name in enumerate("qkv"):
                rows.append((names, ours.replace("{q,k,v}", name), fn, part))
        elif fn == "Tsplit":  # part: (index, parts, first row, last row + 1, rows) of the fused torch weight
            group = re.search(r"\{(.*)\}", ours).group(1).split(",")
            widths = [_fused_width(cfg, name) for name in group]
            starts = np.cumsum([0] + widths)
            for i, name in enumerate(group):
                part = (i, len(group), int(starts[i]), int(starts[i + 1]), int(starts[-1]))
                rows.append((names, ours.replace("{" + ",".join(group) + "}", name), fn, part))
        else:
            rows.append((names, ours, fn, 0))
    return rows


def _fused_width(cfg: ModelConfig, name: str) -> int:
    """Output width of one part of a fused projection."""
    return {"q": cfg.num_heads * cfg.head_dim, "k": cfg.num_kv_heads * cfg.head_dim,
            "v": cfg.num_kv_heads * cfg.head_dim, "gate": cfg.intermediate_size,
            "up": cfg.intermediate_size}[name]


def _flat_params(model) -> dict[str, nnx.Variable]:
    """'a.b.0.c' -> the nnx.Param at that path."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        out[".".join(str(p) for p in path)] = var
    return out


def _score_prefix(path: str) -> str:
    return path[len("backbone."):] if path.startswith("backbone.") else path


# ---------------------------------------------------------------------------------------------- load
def load_pretrained(path: str, dtype=jnp.float32, *, kind: str = "causal_lm",
                    shardings: ModelShardings | None = None, remat: str = "none", seed: int = 0,
                    param_dtype=jnp.float32, logits_chunk: int = 0, vocab_chunk: int = 0):
    """Loads an HF directory into a jaxrl model.

    Args:
      path: directory with config.json and model.safetensors (or a sharded index).
      dtype: compute dtype.
      kind: 'causal_lm' -> `Transformer`; 'score' -> `ScoreModel` (reward model / critic). A score model
        loaded from a causal-LM checkpoint gets a freshly initialised head (DeepSpeed-Chat's critic and
        reward model start that way).
      shardings: parameter layout; under `jax.set_mesh(mesh)` each tensor is placed straight onto its
        shards (each device reads only its slice of the file).
      param_dtype: the parameters' storage dtype: fp32 (the master copy of a model that trains), or the
        compute dtype for a frozen model; each slice is cast as it is read (see `store_params`).
      logits_chunk, vocab_chunk: a causal LM's `Transformer.logits_chunk` and `vocab_chunk`.
    Returns:
      The model, with `source_path` recording `path` (save_pretrained copies its tokenizer from there).
    """
    cfg = read_config(path)
    store = TensorStore(path)
    score = kind == "score"
    if kind not in ("causal_lm", "score"):
        raise ValueError(f"kind must be 'causal_lm' or 'score', got {kind!r}")
    cls = ScoreModel if score else Transformer
    extra = {} if score else {"logits_chunk": logits_chunk, "vocab_chunk": vocab_chunk}
    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(seed), dtype=dtype, shardings=shardings, remat=remat,
                                          **extra))
    abstract = store_params(abstract, param_dtype)  # the abstract dtypes are what each slice is read as
    graphdef, abstract_state = nnx.split(abstract)
    params = {_score_prefix(k) if score else k: (k, v) for k, v in _flat_params(abstract).items()}
    values = {}
    has_head = "score.weight" in store.keys() if score else True
    for hf_names, ours, fn, part in _expand(cfg, score=score):
        if ours not in params:
            continue
        full_path, var = params.pop(ours)
        missing = [n for n in ([hf_names] if isinstance(hf_names, str) else hf_names) if n not in store.keys()]
        if missing:
            if score and ours == "score.kernel" and not has_head:
                values[full_path] = _fresh(var)
                continue
            raise JaxrlError(f"{path}: checkpoint lacks tensor {missing[0]} (needed for {ours})")
        values[full_path] = _load_tensor(store, hf_names, fn, part, var, path)
    if params:
        raise JaxrlError(f"{path}: no checkpoint tensor for parameters {sorted(params)}")
    flat = dict(nnx.to_flat_state(abstract_state))
    for key in list(flat):
        name = ".".join(str(p) for p in key)
        if name in values:
            flat[key] = flat[key].replace(values[name])
    state = nnx.from_flat_state(flat)
    model = nnx.merge(graphdef, state)
    model.source_path = path
    return model


def read_config(path: str) -> ModelConfig:
    if not os.path.isdir(path):
        raise JaxrlError(f"model directory {path} does not exist (give an HF directory or a preset name)")
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise JaxrlError(f"{path} has no config.json: not an HF model directory")
    data = read_json(cfg_file, what="model config", fix=REFETCH)
    try:
        return config_from_hf(data)
    except KeyError as e:
        raise JaxrlError(f"{cfg_file}: the model config lacks {e}, which a {data.get('model_type')} model "
                         f"needs: the file is incomplete; {REFETCH}") from None


def _load_tensor(store: TensorStore, names, fn, part, var, path):
    """One parameter, read slice by slice onto its sharding (no full replica on one device).

    `names` is one tensor name, or the L per-layer names of a stacked parameter: a device then reads,
    from each layer in its slice of the layer axis, only its slice of the other axes.
    """
    stacked = not isinstance(names, str)
    want = tuple(var.shape)
    per_layer = want[1:] if stacked else want
    sources = [_source(store, name, fn, part, per_layer, path) for name in (names if stacked else [names])]
    dtype = var.dtype

    def read(idx):  # idx: a tuple of slices into `want`
        if not stacked:
            return np.asarray(sources[0][idx], dtype=dtype)
        return np.stack([np.asarray(src[idx[1:]], dtype=dtype) for src in sources[idx[0]]])

    sharding = _concrete_sharding(var)
    if sharding is None:
        return jnp.asarray(read(tuple(slice(None) for _ in want)))
    return jax.make_array_from_callback(want, sharding, read)


def _source(store: TensorStore, name, fn, part, want, path):
    """The memory-mapped tensor `name` in our layout (transposed / split as `fn` says), shape-checked."""
    src = store.get(name)
    if fn == "T":
        src = src.T
    elif fn == "split3":
        src = np.split(src, 3, axis=-1)[part]
    elif fn == "Tsplit":
        _, _, lo, hi, total = part
        if tuple(store.shape(name)) != (total, want[0]):
            raise JaxrlError(f"{path}: tensor {name} has shape {tuple(store.shape(name))}, expected "
                             f"{(total, want[0])} for this config")
        src = src[lo:hi].T
    if tuple(src.shape) != want:
        raise JaxrlError(f"{path}: tensor {name} has shape {tuple(store.shape(name))}, expected "
                         f"{want if fn != 'T' else want[::-1]} for this config")
    return src


def _concrete_sharding(var):
    """The NamedSharding an abstract parameter asks for, on the devices of the mesh in context."""
    sharding = getattr(var.get_value(), "sharding", None)
    if sharding is None:
        return None
    return NamedSharding(jax.sharding.get_mesh(), sharding.spec)


def _fresh(var):
    """A newly initialised score head: zeros, like a head whose first scores carry no preference."""
    sharding = _concrete_sharding(var)
    value = jnp.zeros(var.shape, var.dtype)
    return jax.device_put(value, sharding) if sharding is not None else value


# ---------------------------------------------------------------------------------------------- save
def save_pretrained(model, path: str, *, tokenizer=None, dtype=np.float32) -> None:
    """Writes `model` as an HF directory (config.json, model.safetensors, tokenizer files).

    A `Transformer` becomes `...ForCausalLM`, a `ScoreModel` `...ForSequenceClassification` with one label.
    The directory is written next to `path` and renamed into place, so a crash leaves no half-written
    model. Only process 0 writes; every process must call it (parameters are gathered collectively), and
    every process returns only once the directory is in place.
    """
    if has_lora(model):  # export the merged weights; the model itself keeps its LoRA branches
        model = merge_lora(nnx.clone(model))
    score = isinstance(model, ScoreModel)
    cfg = model.config
    tensors, fused_t = {}, set()
    params = {(_score_prefix(k) if score else k): v for k, v in _flat_params(model).items()}
    for hf_names, ours, fn, part in _expand(cfg, score=score):
        if ours not in params:
            continue
        value = to_host(params[ours].get_value())
        rows = [(hf_names, value)] if isinstance(hf_names, str) else zip(hf_names, value)  # layer i = row i
        for hf_name, v in rows:
            if fn == "T":
                tensors[hf_name] = np.ascontiguousarray(v.T)
            elif fn == "split3":
                tensors.setdefault(hf_name, [None] * 3)[part] = v
            elif fn == "Tsplit":  # fused again: the parts side by side in our [in, out] layout, transposed
                tensors.setdefault(hf_name, [None] * part[1])[part[0]] = v
                fused_t.add(hf_name)
            else:
                tensors[hf_name] = v
    tensors = {k: np.concatenate(v, axis=-1) if isinstance(v, list) else v for k, v in tensors.items()}
    tensors = {k: np.ascontiguousarray(v.T if k in fused_t else v).astype(dtype) for k, v in tensors.items()}
    if jax.process_index() == 0:
        _write_directory(model, cfg, score, tensors, path, tokenizer, dtype)
    if jax.process_count() > 1:  # nobody reads the directory before process 0 has renamed it into place
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"save_pretrained:{path}")


def _write_directory(model, cfg, score, tensors, path, tokenizer, dtype):
    from safetensors.numpy import save_file

    if score:  # a sequence classifier needs a pad id, in config.json and the tokenizer alike
        source = tokenizer if tokenizer is not None else _source_tokenizer(model)
        pad = score_pad_id(cfg, source)
        cfg = cfg.replace(pad_token_id=pad)
        if source is not None and pad is not None and source.pad_token_id != pad:
            tokenizer = copy.deepcopy(source)  # the caller's tokenizer keeps its own setting
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        hf_cfg = config_to_hf(cfg, score=score)
        hf_cfg["dtype"] = np.dtype(dtype).name if dtype != np.float32 else "float32"
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        _save_tokenizer(model, tokenizer, tmp)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def score_pad_id(cfg: ModelConfig, tokenizer=None) -> int | None:
    """The pad id a sequence-classification export writes.

    transformers' `...ForSequenceClassification` scores the rightmost token that is not `pad_token_id`
    and refuses batches larger than one without one. jaxrl scores the last real token of
    `prompt + response + EOS`, i.e. the EOS, so the common pad = EOS (TRL, OpenRLHF) would make
    transformers score the token before that EOS instead. The first that exists: the model's pad, the
    tokenizer's pad, its unknown token, BOS (both never end a scored sequence), and EOS only as a last
    resort (with a warning).
    """
    tok = lambda name: getattr(tokenizer, name, None) if tokenizer is not None else None  # noqa: E731
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    if tok("pad_token_id") is not None:
        return tok("pad_token_id")
    eos = set(cfg.eos_ids) | ({tok("eos_token_id")} - {None})
    for candidate in (tok("unk_token_id"), cfg.bos_token_id, tok("bos_token_id")):
        if candidate is not None and candidate not in eos:
            return int(candidate)
    if eos:
        pad = min(eos) if cfg.eos_token_id is None else cfg.eos_ids[0]
        log.warning("the reward model has no pad, unknown or BOS token distinct from EOS; exported with "
                    "pad_token_id = EOS (%d), so transformers scores the token before a trailing EOS", pad)
        return int(pad)
    return None


def _source_tokenizer(model):
    """The tokenizer of the directory `model` was loaded from, or None."""
    src = getattr(model, "source_path", None) or getattr(getattr(model, "backbone", None), "source_path", None)
    if not src or not any(os.path.exists(os.path.join(src, n)) for n in _TOKENIZER_FILES[:2]):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        check_tokenizer_files(src)
        raise JaxrlError(f"could not load the tokenizer of {src} to export it: {e}") from None


def _save_tokenizer(model, tokenizer, out):
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        return
    src = getattr(model, "source_path", None) or getattr(getattr(model, "backbone", None), "source_path", None)
    if src:
        for name in _TOKENIZER_FILES:
            if os.path.exists(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), out)
