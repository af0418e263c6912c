"""jaxrl: DeepSpeed-Chat's RLHF pipeline (SFT, reward model, PPO) and Hybrid Engine in JAX/Flax NNX."""

__version__ = "0.1.0"

# Public API, imported lazily so that `import jaxrl` (and the CLI's --help) stays cheap.
_EXPORTS = {
    "load_pretrained": "jaxrl.models.hf",
    "save_pretrained": "jaxrl.models.hf",
    "Transformer": "jaxrl.models.transformer",
    "ModelConfig": "jaxrl.models.config",
    "generate": "jaxrl.generation",
    "initialize": "jaxrl.deepspeed.engine",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'jaxrl' has no attribute {name!r}")
