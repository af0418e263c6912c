"""An MNIST-style classifier trained through the DeepSpeed-style engine with ZeRO-3 over 8 devices.

The data are synthetic 8x8 "digits" (ten class templates plus noise), so nothing is downloaded. The
config asks for ZeRO stage 3 (every parameter split over the data-parallel devices on its largest
dimension they divide), bf16 compute with fp32 master weights, AdamW with a WarmupCosineLR schedule and
gradient clipping: the DeepSpeed keys a typical PyTorch script uses.

    python examples/mnist_style_classifier.py
"""

import os

# 8 simulated devices when there is no accelerator (the flag only affects the CPU platform).
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jaxrl  # noqa: E402

EPOCHS, TRAIN, TEST, CLASSES, PIXELS = 4, 4096, 1024, 10, 64
BATCH = 128
DS_CONFIG = {
    "train_batch_size": BATCH,
    "gradient_accumulation_steps": 2,
    "zero_optimization": {"stage": 3},
    "bf16": {"enabled": True},
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.999], "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupCosineLR",
                  "params": {"total_num_steps": EPOCHS * TRAIN // BATCH, "warmup_num_steps": 8,
                             "warmup_type": "linear"}},
    "steps_per_print": 16,
}


class Classifier(nnx.Module):
    """Pixels -> 256 -> 128 -> class logits."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(PIXELS, 256, rngs=rngs)
        self.fc2 = nnx.Linear(256, 128, rngs=rngs)
        self.out = nnx.Linear(128, CLASSES, rngs=rngs)

    def __call__(self, x):  # (B, 8, 8) -> (B, CLASSES)
        h = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
        return self.out(nnx.relu(self.fc2(h)))


def loss_fn(model, batch):
    """Cross-entropy (in fp32: bf16 logits are cast back), with accuracy as an aux metric."""
    logits = model(batch["image"]).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


def synthetic_digits(n, rng, templates):
    labels = rng.integers(0, CLASSES, size=n)
    images = templates[labels] + 0.8 * rng.normal(size=(n, 8, 8))
    return images.astype(np.float32), labels.astype(np.int32)


def main(seed=0):
    rng = np.random.default_rng(seed)
    templates = (rng.random((CLASSES, 8, 8)) > 0.5).astype(np.float32)
    images, labels = synthetic_digits(TRAIN, rng, templates)
    test_images, test_labels = synthetic_digits(TEST, rng, templates)

    engine = jaxrl.initialize(model=Classifier(nnx.Rngs(seed)), config=DS_CONFIG)
    params = engine.state.params
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    on_one = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(params))
    print(f"ZeRO-{engine.config.zero_stage} on {engine.config.dp_size} devices: {on_one} of {total} parameter "
          f"bytes per device; micro-batch {engine.micro_batch_size} rows")
    evaluate = nnx.jit(lambda model, x: jnp.argmax(model(x), -1))

    rows = engine.micro_batch_size
    for epoch in range(EPOCHS):
        order = rng.permutation(TRAIN)
        losses = []
        for i in range(0, TRAIN, rows):
            idx = order[i:i + rows]
            metrics = engine.step(loss_fn, {"image": images[idx], "label": labels[idx]})
            losses.append(metrics["loss"])
        accuracy = float(np.mean(np.asarray(evaluate(engine.model, test_images)) == test_labels))
        print(f"epoch {epoch}: train loss {float(np.mean(losses)):.4f}  test accuracy {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
