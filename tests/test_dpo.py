"""DPO losses (jaxrl.algorithms.dpo) against hand computations and the published formulas, the
chosen/rejected sequence log-probs against an unbatched computation, and the `dpo:` config section."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrl.algorithms.dpo import dpo_loss, sequence_logprobs
from jaxrl.config import load_config
from jaxrl.errors import JaxrlError
from jaxrl.models.config import preset
from jaxrl.models.transformer import Transformer

# Two pairs: summed log-probs of policy and reference, chosen and rejected, and response lengths.
PC, PR, RC, RR = [-3.0, -5.0], [-6.0, -4.0], [-4.0, -4.5], [-5.0, -4.2]
NC, NR = [3.0, 5.0], [4.0, 2.0]


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _loss(loss_type, **kw):
    arrays = [jnp.asarray(v, jnp.float32) for v in (PC, PR, RC, RR)]
    return dpo_loss(*arrays, chosen_tokens=jnp.asarray(NC), rejected_tokens=jnp.asarray(NR),
                    loss_type=loss_type, **kw)


def test_sigmoid_and_conservative_dpo_by_hand():
    # h = (pc - rc) - (pr - rr): pair 0 = (1) - (-1) = 2; pair 1 = (-0.5) - (0.2) = -0.7.
    beta, eps = 0.5, 0.1
    by_hand = np.mean([-math.log(_sig(beta * 2.0)), -math.log(_sig(beta * -0.7))])
    loss, m = _loss("sigmoid", beta=beta)
    np.testing.assert_allclose(loss, by_hand, rtol=1e-6)
    # cDPO (Mitchell 2023, eq. 3): -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    cdpo = np.mean([-(1 - eps) * math.log(_sig(beta * h)) - eps * math.log(_sig(-beta * h)) for h in (2.0, -0.7)])
    np.testing.assert_allclose(_loss("sigmoid", beta=beta, label_smoothing=eps)[0], cdpo, rtol=1e-6)
    # Metrics: rewards beta (pi - ref): chosen (0.5, -0.25), rejected (-0.5, 0.1).
    np.testing.assert_allclose(m["rewards/chosen"], np.mean([0.5, -0.25]), rtol=1e-6)
    np.testing.assert_allclose(m["rewards/rejected"], np.mean([-0.5, 0.1]), rtol=1e-6)
    np.testing.assert_allclose(m["rewards/margin"], np.mean([1.0, -0.35]), rtol=1e-6)
    assert float(m["rewards/accuracy"]) == 0.5 and float(m["weight"]) == 2.0
    np.testing.assert_allclose(m["logps/chosen"], -4.0)
    np.testing.assert_allclose(m["logps/rejected"], -5.0)


def test_sigmoid_is_the_dpo_paper_eq7_in_log_ratios():
    # DPO eq. 7: -log sigma(beta log(pi(yw)/ref(yw)) - beta log(pi(yl)/ref(yl))), written with probabilities.
    beta = 0.1
    ratios_w = [math.exp(pc) / math.exp(rc) for pc, rc in zip(PC, RC)]
    ratios_l = [math.exp(pr) / math.exp(rr) for pr, rr in zip(PR, RR)]
    eq7 = np.mean([-math.log(_sig(beta * math.log(w) - beta * math.log(l))) for w, l in zip(ratios_w, ratios_l)])
    np.testing.assert_allclose(_loss("sigmoid", beta=beta)[0], eq7, rtol=1e-6)


def test_ipo_is_eq17_on_length_normalised_logprobs():
    # IPO eq. 17: (h - 1/(2 tau))^2, h from per-token averages (as TRL): pair 0 uses lengths (3, 4),
    # pair 1 (5, 2).
    tau = 0.5
    hs = [(pc / nc - rc / nc) - (pr / nr - rr / nr) for pc, pr, rc, rr, nc, nr in zip(PC, PR, RC, RR, NC, NR)]
    np.testing.assert_allclose(hs, [1 / 3 + 1 / 4, -0.1 - 0.1], rtol=1e-12)
    by_hand = np.mean([(h - 1 / (2 * tau)) ** 2 for h in hs])
    np.testing.assert_allclose(_loss("ipo", beta=tau)[0], by_hand, rtol=1e-6)
    # With every length 1 it is eq. 17 on whole-sequence log-probs.
    ones = jnp.ones(2)
    loss, _ = dpo_loss(*[jnp.asarray(v) for v in (PC, PR, RC, RR)], chosen_tokens=ones, rejected_tokens=ones,
                       loss_type="ipo", beta=tau)
    np.testing.assert_allclose(loss, np.mean([(2.0 - 1.0) ** 2, (-0.7 - 1.0) ** 2]), rtol=1e-6)


def test_hinge_by_hand():
    beta = 0.8  # max(0, 1 - 0.8 * 2) = 0; max(0, 1 + 0.8 * 0.7) = 1.56
    np.testing.assert_allclose(_loss("hinge", beta=beta)[0], np.mean([0.0, 1.56]), rtol=1e-6)


def test_simpo_is_eq6_and_ignores_the_reference():
    # SimPO eq. 6: -log sigma(beta/|yw| log pi(yw) - beta/|yl| log pi(yl) - gamma).
    beta, gamma = 2.0, 0.3
    a = [(2.0 * -3.0 / 3.0) - (2.0 * -6.0 / 4.0), (2.0 * -5.0 / 5.0) - (2.0 * -4.0 / 2.0)]  # 1.0, 2.0
    by_hand = np.mean([-math.log(_sig(x - gamma)) for x in a])
    loss, m = _loss("simpo", beta=beta, simpo_gamma=gamma)
    np.testing.assert_allclose(loss, by_hand, rtol=1e-6)
    np.testing.assert_allclose(m["rewards/chosen"], np.mean([-2.0, -2.0]), rtol=1e-6)
    other_ref, _ = dpo_loss(jnp.asarray(PC), jnp.asarray(PR), jnp.zeros(2), jnp.full(2, 7.0),
                            chosen_tokens=jnp.asarray(NC), rejected_tokens=jnp.asarray(NR),
                            loss_type="simpo", beta=beta, simpo_gamma=gamma)
    assert float(other_ref) == float(loss)


def test_sigmoid_gradient_is_the_closed_form():
    beta, eps = 0.5, 0.2
    hs = np.array([2.0, -0.7])
    g_c, g_r = jax.grad(_sigmoid_loss, argnums=(0, 1))(jnp.asarray(PC), jnp.asarray(PR), beta, eps)
    sig = np.vectorize(_sig)
    # d loss / d pc = (-beta (1 - eps) sigma(-beta h) + beta eps sigma(beta h)) / B; d / d pr = its negative.
    closed = (-beta * (1 - eps) * sig(-beta * hs) + beta * eps * sig(beta * hs)) / 2
    np.testing.assert_allclose(g_c, closed, rtol=1e-5)
    np.testing.assert_allclose(g_r, -closed, rtol=1e-5)
    # The reference is a constant.
    g_ref = jax.grad(lambda rc: dpo_loss(jnp.asarray(PC), jnp.asarray(PR), rc, jnp.asarray(RR),
                                         chosen_tokens=jnp.ones(2), rejected_tokens=jnp.ones(2))[0])(jnp.asarray(RC))
    np.testing.assert_array_equal(g_ref, 0.0)


def _sigmoid_loss(pc, pr, beta, eps):
    return dpo_loss(pc, pr, jnp.asarray(RC), jnp.asarray(RR), chosen_tokens=jnp.ones(2),
                    rejected_tokens=jnp.ones(2), loss_type="sigmoid", beta=beta, label_smoothing=eps)[0]


def test_unknown_loss_type_is_named():
    with pytest.raises(ValueError, match="kto"):
        _loss("kto")


def test_sequence_logprobs_of_padded_pairs_equal_unbatched_rows():
    model = Transformer(preset("tiny"), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    vocab = preset("tiny").vocab_size
    # (prompt length, response length) of chosen 0, chosen 1, rejected 0, rejected 1.
    shapes = [(3, 4), (2, 2), (3, 1), (2, 5)]
    rows = [(rng.integers(3, vocab, p + r), p) for p, r in shapes]
    width = max(len(ids) for ids, _ in rows) + 1

    def pad(left):
        ids = np.zeros((4, width), np.int32)
        attn, loss = np.zeros_like(ids), np.zeros_like(ids)
        for i, (row, p) in enumerate(rows):
            start = width - len(row) if left else 0
            ids[i, start:start + len(row)] = row
            attn[i, start:start + len(row)] = 1
            loss[i, start + p:start + len(row)] = 1
        return jnp.asarray(ids), jnp.asarray(attn), jnp.asarray(loss)

    # The unbatched reference: each row alone, unpadded, its log-probs summed in numpy float64.
    expected = []
    for row, p in rows:
        logits = np.asarray(model(jnp.asarray(row)[None]), np.float64)[0]  # (T, V)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        expected.append(sum(logits[t - 1, row[t]] - logz[t - 1] for t in range(p, len(row))))
    for left, chunk in ((True, 0), (False, 0), (True, 3)):  # chunk 3: the LM head over 3 positions at a time
        model.logits_chunk = chunk
        logp, n = sequence_logprobs(model, *pad(left))
        np.testing.assert_allclose(logp, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(n, [r for _, r in shapes])


def test_dpo_config_section():
    cfg = load_config(None, ["dpo.loss=simpo", "dpo.beta=2", "dpo.simpo_gamma=0.3", "dpo.precompute_ref=true"])
    assert (cfg.dpo.loss, cfg.dpo.beta, cfg.dpo.simpo_gamma, cfg.dpo.precompute_ref) == ("simpo", 2.0, 0.3, True)
    for override, message in [("dpo.beta=0", "dpo.beta must be > 0"),
                              ("dpo.label_smoothing=0.5", "dpo.label_smoothing must be in"),
                              ("dpo.loss=kto", "dpo.loss"), ("dpo.bta=1", "did you mean 'dpo.beta'"),
                              ("dpo.simpo_gamma=-1", "dpo.simpo_gamma must be >= 0")]:
        with pytest.raises(JaxrlError, match=message):
            load_config(None, [override])
    with pytest.raises(JaxrlError, match="dpo.label_smoothing is 0.1 but only dpo.loss=sigmoid"):
        load_config(None, ["dpo.loss=ipo", "dpo.label_smoothing=0.1"])
