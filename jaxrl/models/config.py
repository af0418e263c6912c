"""One config for the decoder-only transformer, covering the Llama (Llama 2/3/3.2, Mistral, Qwen2/2.5,
Qwen3, Phi-3), Gemma 2, Gemma 3 (text), OPT and GPT-2 families; plus tiny presets for fresh models."""

from __future__ import annotations

import dataclasses

from jaxrl.errors import JaxrlError


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    The families differ only in the switches below; `family` picks the HF conversion table.
    """

    family: str  # 'llama' | 'mistral' | 'qwen2' | 'qwen3' | 'phi3' | 'gemma2' | 'gemma3_text' | 'opt' | 'gpt2'
    vocab_size: int
    hidden_size: int  # D: width of the residual stream
    num_layers: int
    num_heads: int  # N: query heads
    num_kv_heads: int  # K: key/value heads (GQA when K < N)
    head_dim: int  # H
    intermediate_size: int  # F: MLP width
    max_position_embeddings: int = 2048
    norm: str = "rms"  # 'rms' | 'layer'
    norm_eps: float = 1e-6
    activation: str = "silu"  # 'silu' | 'relu' | 'gelu_new' | 'gelu'
    gated_mlp: bool = True  # SwiGLU (gate * up) vs plain fc1 -> act -> fc2
    position: str = "rope"  # 'rope' | 'learned'
    position_offset: int = 0  # OPT stores 2 extra rows before position 0
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, object], ...] | None = None  # HF rope_parameters minus theta/type default
    qkv_bias: bool = False
    out_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    pre_norm: bool = True  # False: OPT-350m's post-LN blocks (do_layer_norm_before=False)
    final_norm: bool = True
    embed_dim: int = 0  # E: OPT word_embed_proj_dim; 0 = hidden_size (no project_in/out)
    tie_embeddings: bool = False
    sliding_window: int = 0  # 0 = full attention; which layers slide: `layer_types`
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Qwen3 and Phi-3.
    qk_norm: bool = False  # RMSNorm over each head's H features of queries and keys, before RoPE
    # (attn.q_norm, attn.k_norm: Qwen3, Gemma 3)
    rotary_dim: int = 0  # features of each head RoPE rotates (the first ones, the rest pass); 0 = all H
    # (Phi-3's partial_rotary_factor * H)
    # Gemma 2 / Gemma 3: zero-centred norms, extra norms, scaled embeddings, soft-caps, per-layer attention.
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight); Gemma stores weight - 1, offset 1
    scale_embeddings: bool = False  # token embeddings times sqrt(D), the factor rounded to the compute dtype
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before each residual add
    query_pre_attn_scalar: int = 0  # attention scores scaled by this ** -0.5; 0 = head_dim ** -0.5
    attn_softcap: float = 0.0  # attention scores -> cap * tanh(scores / cap) before the mask; 0 = off
    final_softcap: float = 0.0  # the same on the LM head's logits; 0 = off
    # per layer 'sliding_attention' | 'full_attention'; () = every layer slides iff sliding_window > 0
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float = 0.0  # RoPE base of the sliding layers; 0 = rope_theta (and rope_scaling)
    rope_local_scaling: tuple[tuple[str, object], ...] | None = None  # with rope_local_theta: their scaling

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise JaxrlError(f"model family {self.family!r} is not supported; use one of {sorted(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise JaxrlError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        for name in ("norm", "activation", "position"):
            allowed = _CHOICES[name]
            if getattr(self, name) not in allowed:
                raise JaxrlError(f"model {name} {getattr(self, name)!r} is not one of {allowed}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise JaxrlError(f"rotary_dim ({self.rotary_dim}) must be even and at most head_dim ({self.head_dim})")
        if self.layer_types:
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad or len(self.layer_types) != self.num_layers:
                raise JaxrlError(f"model layer_types must list one of {LAYER_TYPES} for each of the "
                                 f"{self.num_layers} layers; got {list(self.layer_types)}")

    @property
    def rope_dim(self) -> int:
        """The features of each head that RoPE rotates."""
        return self.rotary_dim or self.head_dim

    @property
    def embed_width(self) -> int:
        """E: width of the token embedding (differs from D only for some OPT models)."""
        return self.embed_dim or self.hidden_size

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else (self.eos_token_id,)

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """(L,) whether each layer attends only to the last `sliding_window` slots."""
        if not self.sliding_window:
            return (False,) * self.num_layers
        if not self.layer_types:
            return (True,) * self.num_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt2", "qwen3", "phi3", "gemma2", "gemma3_text")
LAYER_TYPES = ("sliding_attention", "full_attention")
_CHOICES = {
    "norm": ("rms", "layer"),
    "activation": ("silu", "relu", "gelu_new", "gelu"),
    "position": ("rope", "learned"),
}

# Fresh-model presets (`model.path: tiny`): small enough for 2-core CI, dims divisible by 8 so every
# mesh of the test suite can shard them.
PRESETS = {
    "tiny": dict(
        family="llama", vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=128, max_position_embeddings=128, norm_eps=1e-5,
    ),
    "small": dict(  # about 45M parameters (33M of them the untied 32k-vocab embedding and head)
        family="llama", vocab_size=32000, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4,
        head_dim=64, intermediate_size=1408, max_position_embeddings=2048, norm_eps=1e-5,
    ),
    "tinyllama-1.1b": dict(
        family="llama", vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
        head_dim=64, intermediate_size=5632, max_position_embeddings=2048, norm_eps=1e-5,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A fresh-model config by preset name, with field overrides (e.g. the tokenizer's vocab size)."""
    if name not in PRESETS:
        raise JaxrlError(f"unknown model preset {name!r}; use an HF directory or one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
