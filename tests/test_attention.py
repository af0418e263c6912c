"""The training attention core (jaxrl/models/attention.py, a hand-written backward pass) against PyTorch's
scaled_dot_product_attention and its autograd: outputs and all three gradients, GQA, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxrl.models.attention import attention


def _case(b, t, n, k, h, *, pad=0, segments=False, window=0, seed=0):
    rng = np.random.default_rng(seed)
    q, key, value, weight = (rng.normal(size=s).astype(np.float32)
                             for s in [(b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h)])
    real = np.ones((b, t), bool)
    real[0, :pad] = False  # left padding of the first row
    pos = np.arange(t)
    mask = (pos[:, None] >= pos[None, :])[None, None] & real[:, None, None, :]
    if segments:  # two packed sequences per row
        seg = (pos >= t // 3).astype(int)
        mask &= (seg[:, None] == seg[None, :])[None, None]
    if window:
        mask &= (pos[:, None] - pos[None, :] < window)[None, None]
    return q, key, value, weight, mask, real


def _torch_reference(q, key, value, weight, mask, real, scale):
    """Loss sum(out * weight) over real query rows, with torch's SDPA (heads repeated as HF's repeat_kv)."""
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, key, value))
    g = q.shape[2] // key.shape[2]
    out = torch.nn.functional.scaled_dot_product_attention(
        tq.transpose(1, 2), tk.repeat_interleave(g, dim=2).transpose(1, 2),
        tv.repeat_interleave(g, dim=2).transpose(1, 2), attn_mask=torch.tensor(mask), scale=scale).transpose(1, 2)
    rows = torch.tensor(real)[:, :, None, None]
    loss = (torch.where(rows, out, 0.0) * torch.tensor(weight)).sum()
    loss.backward()
    return out.detach().numpy(), [x.grad.numpy() for x in (tq, tk, tv)]


@pytest.mark.parametrize("shape, extra", [
    ((2, 16, 4, 2, 8), dict(pad=5)),              # GQA, a left-padded row
    ((2, 12, 3, 3, 16), {}),                      # MHA
    ((1, 18, 6, 1, 8), dict(segments=True)),      # MQA, packed sequences
    ((2, 16, 4, 2, 8), dict(window=4, pad=3)),    # sliding window
])
def test_attention_matches_torch_sdpa_and_its_gradients(shape, extra):
    q, key, value, weight, mask, real = _case(*shape, **extra)
    scale = shape[-1] ** -0.5
    rows = jnp.asarray(real)[:, :, None, None]

    def loss(q, key, value):
        return jnp.sum(jnp.where(rows, attention(q, key, value, jnp.asarray(mask), scale), 0.0) * weight)

    out = jax.jit(attention, static_argnums=4)(q, key, value, jnp.asarray(mask), scale)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, key, value)
    ref_out, ref_grads = _torch_reference(q, key, value, weight, mask, real, scale)
    np.testing.assert_allclose(np.asarray(out)[real], ref_out[real], atol=2e-6, rtol=1e-5)
    for name, got, want in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_a_row_with_no_visible_key_averages_every_value_stays_finite_and_passes_no_query_gradient():
    q, key, value, _, mask, real = _case(2, 10, 4, 2, 8, pad=4)
    out = np.asarray(attention(q, key, value, jnp.asarray(mask), 0.35))
    assert np.isfinite(out).all()
    # jax.nn.dot_product_attention's convention for such rows (uniform over all keys), which the model had
    want = np.asarray(jax.nn.dot_product_attention(q, key, value, mask=jnp.asarray(mask), scale=0.35))
    np.testing.assert_allclose(out, want, atol=2e-6)
    np.testing.assert_allclose(out[0, 0], np.repeat(value[0].mean(axis=0), 2, axis=0), atol=2e-6)
    # gradients with the pad rows in the loss too: those of autodiff through jax's implementation (the
    # masked scores get none, so a pad row's query gradient is zero)
    w = np.random.default_rng(3).normal(size=out.shape).astype(np.float32)
    grads = jax.grad(lambda *a: jnp.sum(attention(*a, jnp.asarray(mask), 0.35) * w), argnums=(0, 1, 2))(q, key, value)
    want = jax.grad(lambda *a: jnp.sum(jax.nn.dot_product_attention(*a, mask=jnp.asarray(mask), scale=0.35) * w),
                    argnums=(0, 1, 2))(q, key, value)
    assert not np.asarray(grads[0])[0, :4].any()
    for got, ref in zip(grads, want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)


def test_bf16_inputs_keep_their_dtype_and_stay_close_to_fp32():
    q, key, value, weight, mask, _ = _case(2, 16, 4, 2, 8, seed=1)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, key, value)]

    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, jnp.asarray(mask), 0.35).astype(jnp.float32) * weight)

    out = attention(*bf, jnp.asarray(mask), 0.35)
    grads = jax.grad(loss, argnums=(0, 1, 2))(*bf)
    ref = jax.grad(loss, argnums=(0, 1, 2))(*(x.astype(jnp.float32) for x in bf))
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    for got, want in zip(grads, ref):
        scale = float(jnp.max(jnp.abs(want)))
        assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - want))) < 0.02 * scale
