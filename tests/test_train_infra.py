"""The shared loop's infrastructure: metrics writer, checkpoints, stop signals, progress lines."""

import glob
import io
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrl.errors import JaxrlError
from jaxrl.train.checkpoint import Checkpointer
from jaxrl.train.metrics import MetricsWriter, read_metrics
from jaxrl.train.progress import Progress
from jaxrl.train.signals import StopSignal


# ---------------------------------------------------------------- metrics


def test_metrics_jsonl_is_flushed_with_python_scalars(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    writer.write(1, {"loss": jnp.float32(0.5), "reward/mean": np.float64(1.25), "tokens": np.int32(7)})
    # Read before close: a killed run must already have the line on disk.
    with open(tmp_path / "metrics.jsonl") as f:
        line = json.loads(f.readline())
    assert line == {"step": 1, "loss": 0.5, "reward/mean": 1.25, "tokens": 7}
    assert type(line["tokens"]) is int and type(line["loss"]) is float
    writer.write(2, {"loss": 0.25})
    writer.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_metrics_rejects_non_scalars(tmp_path):
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="loss"):
            writer.write(1, {"loss": np.zeros(3)})


def test_truncate_after_drops_later_steps_and_partial_line(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a run killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]

    resumed = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    resumed.truncate_after(3)
    resumed.write(4, {"loss": 40.0})
    resumed.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] == 40.0


def test_read_metrics_names_a_missing_file(tmp_path):
    with pytest.raises(JaxrlError, match="no metrics file"):
        read_metrics(tmp_path)


def test_tensorboard_and_plots(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    for step in range(1, 4):
        writer.write(step, {"loss": 1.0 / step, "reward/mean": float(step)})
    paths = writer.plot()
    writer.close()
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert sorted(os.path.basename(p) for p in paths) == ["loss.png", "reward_mean.png"]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def _strict_lines(path):
    """Each line parsed the way jq and JSON.parse do: NaN and +-Infinity are errors, not numbers."""
    with open(path) as f:
        return [json.loads(line, parse_constant=_reject_constant) for line in f]


def _tensorboard_scalars(directory):
    """{tag: [(step, value), ...]} read back from tensorboardX event files (TFRecord framing: u64 length,
    u32 length crc, the Event proto, u32 data crc)."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = np.frombuffer(data[offset:offset + 8], "<u8")
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + int(length)])
            offset += 12 + int(length) + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_non_finite_metrics_are_null_in_strict_json_and_missing_in_tensorboard(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True)
    writer.write(1, {"loss": 2.0, "grad_norm": 1.5, "skipped_steps": 0})
    # What a skipped fp16 step logs: a NaN gradient norm (a jax scalar), an infinite loss.
    writer.write(2, {"loss": np.float32("inf"), "grad_norm": jnp.float32(jnp.nan), "skipped_steps": 1})
    writer.write(3, {"loss": 1.0, "grad_norm": -np.inf, "skipped_steps": 1})
    writer.close()
    lines = _strict_lines(tmp_path / "metrics.jsonl")
    assert lines[1] == {"step": 2, "loss": None, "grad_norm": None, "skipped_steps": 1}
    assert lines[2] == {"step": 3, "loss": 1.0, "grad_norm": None, "skipped_steps": 1}
    tb = _tensorboard_scalars(tmp_path / "tensorboard")
    assert tb["loss"] == [(1, 2.0), (3, 1.0)]
    assert tb["grad_norm"] == [(1, 1.5)]
    assert tb["skipped_steps"] == [(1, 0.0), (2, 1.0), (3, 1.0)]


def test_plot_leaves_a_gap_at_a_null_step(tmp_path):
    from jaxrl.train.metrics import _figure

    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    for step, norm in [(1, 1.0), (2, float("nan")), (3, 3.0), (4, 4.0)]:
        writer.write(step, {"grad_norm": norm})
    writer.write(4, {"eval/loss": 0.5})  # a line without grad_norm: not part of its curve, not a gap
    assert len(writer.plot()) == 2
    writer.close()
    (line,) = _figure(read_metrics(tmp_path), "grad_norm").axes[0].lines
    drawn = line.get_path().cleaned(remove_nans=True)  # the path the Agg renderer strokes
    np.testing.assert_array_equal(drawn.vertices[:-1], [[1, 1], [3, 3], [4, 4]])
    # MOVETO at step 3: the line stops at step 1 and starts again at 3, nothing drawn at step 2.
    np.testing.assert_array_equal(drawn.codes[:-1], [drawn.MOVETO, drawn.MOVETO, drawn.LINETO])


def test_truncate_after_rewrites_an_old_nan_line_as_null(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:  # written before the writer was strict
        f.write('{"step": 1, "grad_norm": NaN}\n{"step": 2, "grad_norm": Infinity}\n')
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    writer.truncate_after(1)
    writer.close()
    assert _strict_lines(tmp_path / "metrics.jsonl") == [{"step": 1, "grad_norm": None}]


def test_strict_json_nulls_nested_non_finite_values_and_refuses_what_it_cannot_clean():
    from jaxrl.train.metrics import strict_json

    text = strict_json({"ppo": {"kl": np.float32("nan"), "curve": [1.0, float("-inf")]}, "n": 3}, indent=2)
    assert json.loads(text, parse_constant=_reject_constant) == {"ppo": {"kl": None, "curve": [1.0, None]}, "n": 3}
    with pytest.raises(ValueError, match="JSON compliant"):  # allow_nan=False: a NaN that got through raises
        strict_json({"x": np.array([np.nan])}, default=lambda a: a.tolist())


def test_pipeline_summary_json_is_strict(tmp_path):
    from jaxrl.commands.pipeline import _write_json

    _write_json(str(tmp_path / "summary.json"), {"ppo": {"kl": float("nan"), "task_accuracy_after": 0.5}})
    with open(tmp_path / "summary.json") as f:
        assert json.load(f, parse_constant=_reject_constant) == {"ppo": {"kl": None, "task_accuracy_after": 0.5}}


def test_pipeline_figures_treat_a_null_kl_as_missing():
    from jaxrl.commands.pipeline import ppo_figures

    # Ten logged PPO steps (the last fifth: steps 9 and 10), an eval row without kl, a skipped step's nulls.
    rows = [{"step": i, "kl": 0.1 * i, "reward/score": float(i)} for i in range(1, 11)]
    rows[9].update(kl=None, **{"reward/score": None})
    rows.append({"step": 10, "eval/score": 3.0})
    assert ppo_figures(rows) == {"kl": 0.9, "reward_score_first": 1.0, "reward_score_last": 9.0}
    assert ppo_figures([{"step": 1, "kl": None}]) == {"kl": None, "reward_score_first": None,
                                                      "reward_score_last": None}


def test_eval_reward_report_is_strict_json(tmp_path, monkeypatch, capsys):
    from jaxrl import cli
    from jaxrl.commands import eval_reward

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n'
                     '{"prompt": "2+2=", "chosen": "4", "rejected": "5"}\n')
    monkeypatch.setattr(eval_reward, "_check_model_dir", lambda path: None)  # 'tiny': the preset's tokenizer
    # A diverged reward model: one NaN score.
    monkeypatch.setattr(eval_reward, "score_pairs", lambda *a, **k: (np.array([np.nan, 1.0]), np.array([0.0, 0.0])))
    out = tmp_path / "report.json"
    assert cli.main(["eval-reward", "--model", "tiny", "--data", str(pairs), "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out, parse_constant=_reject_constant)
    with open(out) as f:
        assert json.load(f, parse_constant=_reject_constant) == printed
    assert printed["chosen_mean"] is None and printed["rejected_mean"] == 0.0


def test_disabled_writer_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "run", enabled=False)
    writer.write(1, {"loss": 1.0})
    assert writer.plot() == []
    writer.close()
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- checkpoints


def _sharded_state():
    mesh = jax.make_mesh((8,), ("data",))
    row = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    w = jax.device_put(jnp.arange(64, dtype=jnp.float32).reshape(16, 4) / 7, row)
    b = jax.device_put(jnp.linspace(-1, 1, 5, dtype=jnp.bfloat16), replicated)
    return {"params": {"w": w, "b": b}, "count": jax.device_put(jnp.int32(3), replicated)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_checkpoint_round_trip_keeps_shardings_and_bits(tmp_path):
    state = _sharded_state()
    extra = {"data_position": 12, "rng": np.array([0, 42], dtype=np.uint32), "loss_scale": 65536.0}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(10, state, extra)
        ckpt.wait()
        assert ckpt.latest_step() == 10
        restored, restored_extra = ckpt.restore(target=_abstract(state))
    assert restored_extra == {"data_position": 12, "rng": [0, 42], "loss_scale": 65536.0}
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        assert got.sharding == want.sharding
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert restored["params"]["w"].addressable_shards[0].data.shape == (2, 4)


def test_checkpoint_keeps_the_last_two(tmp_path):
    state = {"x": jnp.ones(4)}
    with Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, state, {"step": step})
        assert ckpt.all_steps() == [2, 3]
        with pytest.raises(JaxrlError, match="available steps: \\[2, 3\\]"):
            ckpt.restore(1)
        _, extra = ckpt.restore(2)
        assert extra == {"step": 2}


def test_half_written_checkpoint_is_ignored(tmp_path):
    state = {"x": jnp.arange(4.0)}
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state, {"step": 1})
    # Orbax writes step N into "N.orbax-checkpoint-tmp" and renames it to "N" only when every process
    # has finished; a kill before the rename leaves exactly this, complete-looking but not finalised.
    shutil.copytree(tmp_path / "1", tmp_path / "5.orbax-checkpoint-tmp")
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        assert ckpt.latest_step() == 1
        assert ckpt.all_steps() == [1]
        _, extra = ckpt.restore()
        assert extra == {"step": 1}


def test_checkpoint_extra_must_be_json(tmp_path):
    with Checkpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(JaxrlError, match="JSON"):
            ckpt.save(1, {"x": jnp.ones(2)}, {"bad": object()})


# ---------------------------------------------------------------- signals and progress


def test_stop_signal_catches_sigterm_and_restores_handlers():
    # The previous SIGINT handler is Python's (raises KeyboardInterrupt) whatever the runner inherited: a
    # process started in the background by a non-interactive shell inherits SIGINT ignored.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _stop_signal_round_trip()
    finally:
        signal.signal(signal.SIGINT, inherited)


def _stop_signal_round_trip():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignal() as stop:
        assert stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM"
        assert stop.requested_anywhere()
        # A second signal goes to the previous handler: pytest's SIGINT handler raises.
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_progress_prints_plain_lines_when_not_a_tty():
    stream = io.StringIO()
    with Progress(4, initial=0, log_every=2, show=("loss",), desc="sft", enabled=True, stream=stream) as bar:
        for step in range(1, 5):
            bar.update(step, {"loss": jnp.float32(0.5 / step), "hidden": 1.0})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("sft: step 2/4 loss=0.25 (")
    assert "it/s, eta" in lines[1] and "hidden" not in lines[1]
