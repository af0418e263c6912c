"""DeepSpeed's getting-started example in JAX: a linear model fit to y = 3x + 2 + noise.

The DeepSpeed config is the document's, unchanged; the model is an `nnx.Linear`, the optimizer an optax
Adam, and `engine.step` replaces DeepSpeed's `engine(batch)`, `engine.backward(loss)`, `engine.step()`.
With fp16 the scaler starts at 2^16, the first optimizer steps overflow and are skipped while it backs
off (DeepSpeed prints "OVERFLOW! ... reducing loss scale" for the same thing).

    python examples/linear_regression.py
"""

import os

# 8 simulated devices when there is no accelerator (the flag only affects the CPU platform).
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import jaxrl  # noqa: E402

DS_CONFIG = {"train_batch_size": 32, "gradient_accumulation_steps": 4, "fp16": {"enabled": True}}


def loss_fn(model, batch):
    """Mean squared error; fp16 compute, so the error is taken back to fp32 first."""
    pred = model(batch["x"]).astype(jnp.float32)
    return jnp.mean((pred - batch["y"].astype(jnp.float32)) ** 2)


def main(epochs=5, samples=1024, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 1)).astype(np.float32)
    y = (3 * x + 2 + 0.1 * rng.normal(size=x.shape)).astype(np.float32)

    engine = jaxrl.initialize(model=nnx.Linear(1, 1, rngs=nnx.Rngs(seed)), optimizer=optax.adam(0.05),
                              config=DS_CONFIG)
    rows = engine.micro_batch_size  # train_batch_size / gradient_accumulation_steps, over all devices
    print(f"{engine.config.dp_size} data-parallel devices, micro-batch {rows} rows, "
          f"{engine.gradient_accumulation_steps} micro-batches per update")
    for epoch in range(epochs):
        order = rng.permutation(samples)
        losses = []
        for i in range(0, samples, rows):
            idx = order[i:i + rows]
            metrics = engine.step(loss_fn, {"x": x[idx], "y": y[idx]})
            losses.append(metrics["loss"])
        print(f"epoch {epoch}: loss {float(np.mean(losses)):.4f}  loss scale {float(metrics['loss_scale']):g}  "
              f"skipped steps {int(metrics['skipped_steps'])}")
    w, b = float(engine.model.kernel[0, 0]), float(engine.model.bias[0])
    print(f"learned y = {w:.3f} x + {b:.3f}  (true: 3x + 2)")
    return w, b


if __name__ == "__main__":
    main()
