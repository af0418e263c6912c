"""The KV-cache sampler against transformers' PyTorch `generate`, sampling filters, EOS, buckets, CLI."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from compiles import compiles
import hf_fixtures as fx
from jaxrl import cli
from jaxrl import generation as gen
from jaxrl.errors import JaxrlError
from jaxrl.models.hf import load_pretrained
from jaxrl.parallel.sharding import model_shardings

N = 8  # max_new_tokens everywhere, so compilations are shared between tests


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (directory, torch model, jaxrl model), fp32."""
    out = {}
    for family in fx.FAMILIES:
        d = str(tmp_path_factory.mktemp(family))
        torch_model = fx.make_hf_model(family, d)
        out[family] = (d, torch_model, load_pretrained(d))
    return out


def _prompts(ids, mask):
    return [row[m.astype(bool)].tolist() for row, m in zip(ids, mask)]


def _until_eos(row, eos_ids):
    out = []
    for t in row:
        out.append(int(t))
        if t in eos_ids:
            break
    return out


def _hf_greedy(torch_model, ids, mask, eos_ids):
    import torch

    with torch.no_grad():
        out = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                   max_new_tokens=N, pad_token_id=torch_model.config.pad_token_id,
                                   eos_token_id=list(eos_ids))
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("family", fx.FAMILIES)
def test_greedy_matches_transformers(models, family):
    _, torch_model, model = models[family]
    assert_greedy_matches_transformers(torch_model, model)


def assert_greedy_matches_transformers(torch_model, model):
    """Batched greedy generation of the padded batch equals transformers' token for token, with a second
    EOS id the model really emits, so at least row 1 stops early."""
    ids, mask = fx.padded_batch()
    free = _hf_greedy(torch_model, ids, mask, (3,))
    eos_ids = (3, int(free[1, 2]))
    ref = _hf_greedy(torch_model, ids, mask, eos_ids)
    out = gen.generate(model, _prompts(ids, mask), max_new_tokens=N, eos_ids=eos_ids)
    assert out == [_until_eos(r, eos_ids) for r in ref]
    assert len(out[1]) <= 3 and out[1][-1] in eos_ids


def _full_logits(model, ids, mask):
    return np.asarray(nnx.jit(lambda m, i, k: m(i, k))(model, jnp.asarray(ids), jnp.asarray(mask)))


def _run(model, cfg, seed=0):
    ids, mask = fx.padded_batch()
    out = gen.generate_batch(model, ids, mask, cfg, jax.random.key(seed))
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def llama_greedy(models):
    """The llama model and its greedy output with no EOS (all N tokens)."""
    model = models["llama"][2]
    return model, _run(model, gen.SamplerConfig(max_new_tokens=N, pad_id=0))


def test_rows_stop_independently_at_eos(llama_greedy):
    model, free = llama_greedy
    eos_ids = (int(free["tokens"][0, 1]), int(free["tokens"][2, 5]))
    out = _run(model, gen.SamplerConfig(max_new_tokens=N, eos_ids=eos_ids, pad_id=0))
    stops = []
    for r in range(3):
        hits = [t for t in range(N) if free["tokens"][r, t] in eos_ids]
        stop = hits[0] if hits else N - 1
        stops.append(stop)
        # rows are independent: up to its EOS each row is the free run, then pad, mask 0, logprob 0
        np.testing.assert_array_equal(out["tokens"][r, :stop + 1], free["tokens"][r, :stop + 1])
        np.testing.assert_allclose(out["logprobs"][r, :stop + 1], free["logprobs"][r, :stop + 1], atol=1e-5)
        assert (out["tokens"][r, stop + 1:] == 0).all()
        assert (out["logprobs"][r, stop + 1:] == 0).all()
        np.testing.assert_array_equal(out["mask"][r], np.arange(N) <= stop)
    assert stops[0] == 1 and stops[2] <= 5 and len(set(stops)) > 1, stops
    assert (free["mask"] == 1).all()


def test_sampling_is_seeded_and_logprobs_and_top_k_hold(llama_greedy):
    model, _ = llama_greedy
    cfg = gen.SamplerConfig(max_new_tokens=N, temperature=0.7, top_k=3, top_p=0.9, pad_id=0)
    a, b, c = _run(model, cfg, seed=1), _run(model, cfg, seed=1), _run(model, cfg, seed=2)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["logprobs"], b["logprobs"])
    assert (a["tokens"] != c["tokens"]).any()

    ids, mask = fx.padded_batch()
    tp = ids.shape[1]
    logits = _full_logits(model, np.concatenate([ids, a["tokens"]], 1), np.concatenate([mask, a["mask"]], 1))
    step_logits = logits[:, tp - 1:tp - 1 + N]  # (B, N, V): the logits each generated token was drawn from
    logp = jax.nn.log_softmax(step_logits, axis=-1)
    picked = np.take_along_axis(np.asarray(logp), a["tokens"][..., None], -1)[..., 0]
    np.testing.assert_allclose(a["logprobs"], picked, atol=1e-4)
    top3 = np.argsort(-step_logits, axis=-1)[..., :3]
    assert (top3 == a["tokens"][..., None]).any(-1).all()
    assert len(np.unique(a["tokens"])) > 3  # really sampled, not a degenerate constant


def test_filters_keep_only_the_allowed_tokens():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.3, 0.1, 0.05]] * 2000))  # (B, V), one distribution per row
    key = jax.random.key(0)

    def draw(**kw):
        cfg = gen.SamplerConfig(max_new_tokens=1, temperature=1.0, **kw)
        return set(np.asarray(gen.sample_tokens(logits, key, cfg)).tolist())

    assert draw(top_k=1) == {1} and draw(top_p=1e-6) == {1}  # both reduce to greedy
    assert draw(top_k=3) == {1, 2, 3}
    assert draw(top_p=0.6) == {1, 2}  # 0.5 < 0.6 <= 0.5 + 0.3: the smallest set reaching p
    assert draw(top_p=0.85) == {1, 2, 3}
    assert draw(top_k=3, top_p=0.85) == {1, 2}  # top-k first; over the 3 left: 0.56, 0.33, 0.11
    assert draw() == {0, 1, 2, 3, 4}
    greedy = gen.sample_tokens(logits, key, gen.SamplerConfig(max_new_tokens=1))
    assert (np.asarray(greedy) == 1).all()


PROMPTS_A = [[5, 6, 7], list(range(4, 20)), [9]]  # longest 16 -> prompt bucket 16, 3 rows -> 4
PROMPTS_B = [[30, 31], [40] * 11, [50, 51, 52, 53], [60, 61]]  # same buckets


def test_batches_of_one_bucket_compile_once(llama_greedy):
    model, _ = llama_greedy
    with compiles() as first:
        out_a = gen.generate(model, PROMPTS_A, max_new_tokens=N)
    assert first["prefill"] <= 1 and first["decode"] <= 1
    with compiles() as second:
        out_b = gen.generate(model, PROMPTS_B, max_new_tokens=N, temperature=0.0)
    assert second["prefill"] == second["decode"] == 0
    assert all(len(o) == N or (len(o) < N and o[-1] == 3) for o in out_a + out_b)
    # padding a batch up to its bucket changes nothing for the real rows
    assert gen.generate(model, PROMPTS_A[:1], max_new_tokens=N, batch_size=1) == out_a[:1]


def test_buckets():
    assert [gen.prompt_bucket(n, 128) for n in (1, 16, 17, 100, 127)] == [16, 16, 32, 128, 128]
    assert gen.prompt_bucket(40, 48) == 48
    assert [gen.batch_bucket(b) for b in (1, 3, 5, 64, 65)] == [1, 4, 8, 64, 128]
    assert gen.batch_bucket(3, multiple=8) == 8 and gen.batch_bucket(9, multiple=4) == 16


def test_tensor_parallel_model_with_sharded_rows_gives_the_same_tokens(models):
    directory, _, model = models["llama"]
    mesh = jax.make_mesh((4, 1, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        tp_model = load_pretrained(directory, shardings=model_shardings(shard_params=False))
    assert tp_model.layers.attn.q.kernel[...].sharding.spec == P(None, None, "tensor")
    rows = NamedSharding(mesh, P("data"))
    out = gen.generate(tp_model, PROMPTS_A, max_new_tokens=N, batch_sharding=rows)
    assert out == gen.generate(model, PROMPTS_A, max_new_tokens=N)


@pytest.mark.parametrize("temperature, rows_over", [(0.0, 1), (1.0, 1), (1.0, 2), (1.0, 8)])
def test_groups_sharing_a_prefill_give_the_unshared_outputs(models, temperature, rows_over):
    """Rows in groups of G copies of one prompt (GRPO): `group=G` prefills each distinct prompt once and
    repeats its cache and last logits; greedy or sampled with the same key, tokens, log-probs and masks are
    those of the unshared path (log-probs to 1e-6), with the rows over 1, 2 or 8 devices (2 distinct prompts over 8 shards:
    the heads are replicated). Sampled rows of one group still differ (an independent draw per row)."""
    directory, _, model = models["llama"]
    ids, mask = fx.padded_batch()
    group = 4
    ids, mask = np.repeat(ids[:2], group, axis=0), np.repeat(mask[:2], group, axis=0)  # (8, Tp), 2 prompts
    cfg = gen.SamplerConfig(max_new_tokens=N, temperature=temperature, pad_id=0)
    mesh = jax.make_mesh((rows_over,), ("data",), devices=jax.devices()[:rows_over],
                         axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    with jax.set_mesh(mesh):
        outs = [{k: np.asarray(v) for k, v in gen.generate_batch(model, ids, mask, cfg, jax.random.key(3),
                                                                   batch_sharding=rows, group=g).items()}
                for g in (1, group)]
    for k in ("tokens", "mask"):
        np.testing.assert_array_equal(outs[1][k], outs[0][k], err_msg=k)
    # a prefill over B/G rows instead of B may round differently in the last bit (seen: 4.8e-7 at -4.26)
    np.testing.assert_allclose(outs[1]["logprobs"], outs[0]["logprobs"], rtol=0, atol=1e-6)
    if temperature:
        assert len({tuple(r) for r in outs[1]["tokens"][:group]}) > 1
    with pytest.raises(JaxrlError, match="not a whole number of groups of 3"):
        gen.generate_batch(model, ids, mask, cfg, jax.random.key(3), group=3)


def test_bad_inputs_raise_clear_errors(llama_greedy):
    model, _ = llama_greedy
    with pytest.raises(JaxrlError, match="prompt 1 is empty"):
        gen.generate(model, [[4], []])
    with pytest.raises(JaxrlError, match="max_position_embeddings"):
        gen.generate(model, [[4] * 100], max_new_tokens=64)
    with pytest.raises(JaxrlError, match="top_p"):
        gen.SamplerConfig(max_new_tokens=4, top_p=0.0)


def test_cli_writes_jsonl_and_reports_missing_inputs(models, tmp_path, capsys, monkeypatch):
    # route only `generate`, so this test does not depend on the other commands' modules
    monkeypatch.setattr(cli, "COMMANDS", {"generate": cli.COMMANDS["generate"]})
    directory, _, model = models["llama"]
    texts = ["the quick brown", "jax and", "hello world"]  # 3 prompts: the batch bucket of the tests above
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n\n".join(json.dumps({"prompt": t}) for t in texts) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", "--model", directory, "--prompts-file", str(prompts), "--greedy",
                     "--max-new-tokens", str(N), "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == texts
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    expected = gen.generate(model, [tok(t)["input_ids"] for t in texts], max_new_tokens=N)
    assert [r["completion"] for r in rows] == [tok.decode(e, skip_special_tokens=True) for e in expected]

    assert cli.main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 1
    assert f"model directory {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert cli.main(["generate", "--model", directory, "--prompts-file", str(tmp_path / "none.txt")]) == 1
    assert "prompts file" in capsys.readouterr().err
    assert cli.main(["generate", "--model", directory, "--prompt", "hi", "--chat"]) == 1
    assert "no chat_template" in capsys.readouterr().err
    assert cli.main(["generate", "--model", directory, "--prompt", "hi", "--greedy", "--top-k", "3"]) == 1
