"""The data pipeline: readers, formats, split, tokenization, iterator (pure Python/numpy, no downloads)."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from jaxrl.data import formats, readers, split as split_lib
from jaxrl.data.dataset import load_records
from jaxrl.data.formats import PreferenceRecord, PromptRecord, parse_rows
from jaxrl.data.iterator import BatchIterator
from jaxrl.data.tokenize import Encoder, batch_rows, tokenize_pairs, tokenize_prompts, tokenize_sft
from jaxrl.errors import JaxrlError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<unk>", "<pad>", "<eos>", "<bos>"]


def fixture(name):
    return os.path.join(FIXTURES, name)


def make_tokenizer(*, pad=True, bos=False, eos_after=False):
    """A word-level tokenizer trained on the fixture texts; `bos`/`eos_after` make its special-token
    handling put <bos> before / <eos> after every encoded text, as Llama-like tokenizers do."""
    corpus = [open(fixture(n)).read() for n in sorted(os.listdir(FIXTURES))]
    corpus += ["<| user system assistant |> a b c d e f g h i j word long"]
    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    template = " ".join((["<bos>"] if bos else []) + ["$A"] + (["<eos>"] if eos_after else []))
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, tok.token_to_id(t)) for t in ("<bos>", "<eos>")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>",
        pad_token="<pad>" if pad else None, chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- readers and formats


@pytest.mark.parametrize(
    "name, fmt, first",
    [
        ("prompt_chosen_rejected.jsonl", "prompt_chosen_rejected",
         PreferenceRecord("Human: what is two plus two ? Assistant:", " four", " five", "")),
        ("rm_static.json", "rm_static",
         PreferenceRecord("\n\nHuman: name a fruit\n\nAssistant:", " apple", " car", "")),
        ("hh_rlhf.jsonl", "hh_rlhf",
         PreferenceRecord("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name a fruit\n\nAssistant:",
                          " an apple", " a car", "")),
    ],
)
def test_preference_formats_and_auto_detection(name, fmt, first):
    rows = readers.read_rows(fixture(name))
    assert formats.detect_format(rows[0]) == fmt
    for chosen_fmt in (fmt, "auto"):
        records = parse_rows(rows, chosen_fmt, "reward").records
        assert records[0] == PreferenceRecord(first.prompt, first.chosen, first.rejected, rows[0].origin)
    assert len(records) == len(rows)


def test_jsonl_origin_skips_blank_lines():
    rows = readers.read_rows(fixture("prompt_chosen_rejected.jsonl"))
    assert len(rows) == 4
    assert rows[3].origin == f"{fixture('prompt_chosen_rejected.jsonl')} line 4"


def test_hh_rlhf_split_is_at_last_shared_assistant_turn():
    records = parse_rows(readers.read_rows(fixture("hh_rlhf.jsonl")), "hh_rlhf", "reward").records
    assert records[1] == PreferenceRecord("\n\nHuman: say yes\n\nAssistant:", " yes", " no", records[1].origin)
    diverging = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: b"}
    rows = [readers.Row(diverging, "x", "line 1")]
    with pytest.raises(JaxrlError, match=r"x line 1: .*share no prefix"):
        parse_rows(rows, "hh_rlhf", "reward")


def test_prompt_response_for_each_need():
    rows = readers.read_rows(fixture("prompt_response.json"))
    assert formats.detect_format(rows[0]) == "prompt_response"
    prompts = parse_rows(rows, "auto", "prompt").records
    assert [r.response for r in prompts] == [None, None, None]
    with pytest.raises(JaxrlError, match=r"prompt_response.json row 2: no response"):
        parse_rows(rows, "prompt_response", "sft")
    parsed = parse_rows(rows, "prompt_response", "sft", skip_bad_rows=True)
    assert [r.response for r in parsed.records] == [" apple", " blue"]
    assert parsed.skipped == 1 and "row 2" in parsed.first_problem
    with pytest.raises(JaxrlError, match="no chosen/rejected pair"):
        parse_rows(rows, "prompt_response", "reward")


def test_preferences_feed_sft_with_chosen():
    records = parse_rows(readers.read_rows(fixture("prompt_chosen_rejected.jsonl")), "auto", "sft").records
    assert records[0] == PromptRecord("Human: what is two plus two ? Assistant:", " four", records[0].origin)


def test_conversation_uses_chat_template(tokenizer):
    rows = readers.read_rows(fixture("conversation.jsonl"))
    assert formats.detect_format(rows[0]) == "conversation"
    prompts = parse_rows(rows, "auto", "prompt", tokenizer=tokenizer).records
    assert prompts[0].prompt == "<|user|> name a fruit\n<|assistant|>"
    assert prompts[1].prompt == "<|system|> be brief\n<|user|> say hello\n<|assistant|>"
    sft = parse_rows(rows, "conversation", "sft", tokenizer=tokenizer, skip_bad_rows=True)
    assert (sft.records[0].response, sft.skipped) == ("apple", 1)  # row 1 has no assistant answer
    pairs = parse_rows(rows[2:], "conversation", "reward", tokenizer=tokenizer).records
    assert pairs[0] == PreferenceRecord("<|user|> name a color\n<|assistant|>", "blue", "seven", rows[2].origin)
    assert pairs[1] == PreferenceRecord("<|user|> say yes\n<|assistant|>", "yes", "no", rows[3].origin)
    with pytest.raises(JaxrlError, match="chat_template"):
        parse_rows(rows, "conversation", "sft", tokenizer=None)


def test_json_data_key_and_list(tmp_path):
    records = [{"prompt": "p", "response": "r"}]
    a = write(tmp_path, "a.json", json.dumps({"data": records}))
    b = write(tmp_path, "b.json", json.dumps(records))
    assert readers.read_rows(a)[0].data == readers.read_rows(b)[0].data == records[0]
    assert readers.read_rows(b)[0].origin == f"{b} row 0"
    with pytest.raises(JaxrlError, match=r"c.json row 1: expected a JSON object"):
        readers.read_rows(write(tmp_path, "c.json", '[{"prompt": "p"}, 3]'))


def test_parquet_goes_through_lazily_imported_pyarrow(tmp_path, monkeypatch):
    path = write(tmp_path, "d.parquet", "")
    fake = types.ModuleType("pyarrow.parquet")
    fake.read_table = lambda p: types.SimpleNamespace(to_pylist=lambda: [{"prompt": "p", "response": "r"}])
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", fake)
    rows = readers.read_rows(path)
    assert rows[0].data == {"prompt": "p", "response": "r"} and rows[0].where == "row 0"
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # None makes the import fail
    with pytest.raises(JaxrlError, match="d.parquet: reading this needs `pyarrow`"):
        readers.read_rows(path)


def test_directory_must_be_a_saved_hf_dataset(tmp_path, monkeypatch):
    with pytest.raises(JaxrlError, match="save_to_disk"):
        readers.read_rows(tmp_path)
    write(tmp_path, "state.json", "{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(JaxrlError, match="needs `datasets`"):
        readers.read_rows(tmp_path)


# ---------------------------------------------------------------- errors a user can act on


@pytest.mark.parametrize(
    "text, fmt, message",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n', "prompt_response",
         r"bad.jsonl line 2: invalid JSON"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n',
         "prompt_chosen_rejected", r"bad.jsonl line 2: missing column 'rejected'"),
        ('{"prompt": "a", "response": "b"}\n\n{"prompt": " ", "response": "b"}\n', "prompt_response",
         r"bad.jsonl line 3: column 'prompt' is empty"),
        ('{"prompt": 5, "response": "b"}\n', "auto", r"bad.jsonl line 1: column 'prompt' must be a string"),
        ('{"text": "a"}\n', "auto", r"bad.jsonl line 1: data.format=auto cannot tell"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, text, fmt, message):
    path = write(tmp_path, "bad.jsonl", text)
    with pytest.raises(JaxrlError, match=message):
        load_records(path, need="sft", fmt=fmt)


def test_missing_file_and_unknown_kind(tmp_path):
    with pytest.raises(JaxrlError, match="data file not found: .*nope.jsonl"):
        load_records(str(tmp_path / "nope.jsonl"), need="sft")
    with pytest.raises(JaxrlError, match="unknown data file type '.csv'"):
        load_records(write(tmp_path, "a.csv", "x"), need="sft")
    with pytest.raises(JaxrlError, match="data.format='alpaca' is unknown"):
        load_records(fixture("prompt_response.json"), need="prompt", fmt="alpaca")


def test_skip_bad_rows_counts_and_empty_dataset_errors(tmp_path):
    text = '{"prompt": "", "response": "b"}\n{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n'
    path = write(tmp_path, "some.jsonl", text)
    parsed = load_records(path, need="sft", skip_bad_rows=True)
    assert (len(parsed.records), parsed.skipped) == (1, 2)
    all_bad = r"no usable data in .*bad.jsonl: all 1 rows .* malformed \(first: .*line 1"
    with pytest.raises(JaxrlError, match=all_bad):
        load_records(write(tmp_path, "bad.jsonl", '{"prompt": ""}\n'), need="prompt", skip_bad_rows=True)
    with pytest.raises(JaxrlError, match=r"empty.jsonl: the files hold no rows"):
        load_records(write(tmp_path, "empty.jsonl", "\n"), need="sft")
    with pytest.raises(JaxrlError, match=r"data.split='1,0,1' gives step 2 none of the 3 rows"):
        load_records(path, need="sft", split="1,0,1", step=2, skip_bad_rows=True)


# ---------------------------------------------------------------- split and blend


def test_split_portions_are_disjoint_complete_and_stable():
    rows = list(range(103))
    parts = [split_lib.portion(rows, "2,4,4", step, seed=7) for step in (1, 2, 3)]
    assert [len(p) for p in parts] == [21, 41, 41]
    assert sorted(sum(parts, [])) == rows
    assert parts[0] == split_lib.portion(rows, "2,4,4", 1, seed=7)
    assert parts[0] != split_lib.portion(rows, "2,4,4", 1, seed=8)
    code = "from jaxrl.data.split import portion; print(portion(list(range(103)), '2,4,4', 1, seed=7))"
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other_process.stdout.strip() == str(parts[0])
    with pytest.raises(JaxrlError, match="data.split='2,x'"):
        split_lib.portion(rows, "2,x", 1, seed=0)
    with pytest.raises(JaxrlError, match="step 4 has none"):
        split_lib.portion(rows, "2,4,4", 4, seed=0)


def test_blending_several_files_is_a_seeded_shuffle_of_their_portions():
    paths = [fixture("prompt_chosen_rejected.jsonl"), fixture("rm_static.json"), fixture("hh_rlhf.jsonl")]
    blended = load_records(paths, need="reward", split="1,1", step=2, seed=3).records
    alone = [load_records(p, need="reward", split="1,1", step=2, seed=3).records for p in paths]
    assert sorted(r.origin for r in blended) == sorted(r.origin for part in alone for r in part)
    assert blended == load_records(paths, need="reward", split="1,1", step=2, seed=3).records
    assert len(blended) == 2 + 1 + 1


# ---------------------------------------------------------------- tokenization


def ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_sft_eos_once_and_loss_mask_on_response(tokenizer):
    enc = Encoder.from_tokenizer(tokenizer)
    assert (enc.eos_id, enc.pad_id, enc.prefix) == (tokenizer.eos_token_id, tokenizer.pad_token_id, ())
    records = [
        PromptRecord("name a fruit", "an apple", "x"),
        PromptRecord("name a fruit", "an apple<eos>", "y"),
    ]
    out = tokenize_sft(records, enc, max_len=8)
    prompt, response = ids(tokenizer, "name a fruit"), ids(tokenizer, "an apple")
    expected = prompt + response + [enc.eos_id]
    for row in range(2):
        padded = expected + [enc.pad_id] * (8 - len(expected))
        np.testing.assert_array_equal(out.arrays["input_ids"][row], padded)
        np.testing.assert_array_equal(out.arrays["loss_mask"][row], [0, 0, 0, 1, 1, 1, 0, 0])
        np.testing.assert_array_equal(out.arrays["attention_mask"][row], [1] * 6 + [0, 0])
    on_prompt = tokenize_sft(records, enc, max_len=8, loss_on_prompt=True)
    np.testing.assert_array_equal(on_prompt.arrays["loss_mask"][0], [1] * 6 + [0, 0])


def test_tokenizer_special_tokens_are_not_doubled():
    tok = make_tokenizer(pad=False, bos=True, eos_after=True)
    enc = Encoder.from_tokenizer(tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert (enc.prefix, enc.pad_id) == ((bos,), eos)  # no pad token: pad with EOS
    records = [PromptRecord("say yes", "yes", "x"), PromptRecord("<bos> say yes", "yes<eos>", "y")]
    out = tokenize_sft(records, enc, max_len=5)
    for row in out.arrays["input_ids"]:
        np.testing.assert_array_equal(row, [bos, *ids(tok, "say yes yes"), eos])
    prompts = tokenize_prompts(records, enc, max_prompt_len=4).arrays
    np.testing.assert_array_equal(prompts["input_ids"][0], [eos, bos, *ids(tok, "say yes")])  # left padded
    np.testing.assert_array_equal(prompts["attention_mask"][0], [0, 1, 1, 1])


def test_truncation_keeps_response_end_and_drops_long_prompts(tokenizer):
    enc = Encoder.from_tokenizer(tokenizer)
    long_prompt = "a b c d e f g"
    out = tokenize_sft([PromptRecord(long_prompt, "an apple", "x")], enc, max_len=6)
    np.testing.assert_array_equal(out.arrays["input_ids"][0], ids(tokenizer, "e f g an apple") + [enc.eos_id])
    np.testing.assert_array_equal(out.arrays["loss_mask"][0], [0, 0, 0, 1, 1, 1])
    out = tokenize_sft([PromptRecord(long_prompt, "a b c d e", "x")], enc, max_len=4)
    np.testing.assert_array_equal(out.arrays["input_ids"][0], ids(tokenizer, "c d e") + [enc.eos_id])
    records = [PromptRecord(long_prompt, "yes", "x"), PromptRecord("say yes", "yes", "y")]
    out = tokenize_sft(records, enc, max_len=12, max_prompt_len=3)
    assert (len(out), out.dropped) == (1, 1)
    with pytest.raises(JaxrlError, match=r"all 1 examples dropped: .*max_prompt_len=3 .*first: x"):
        tokenize_sft(records[:1], enc, max_len=12, max_prompt_len=3)


def test_pairs_end_in_eos(tokenizer):
    enc = Encoder.from_tokenizer(tokenizer)
    records = parse_rows(readers.read_rows(fixture("hh_rlhf.jsonl")), "hh_rlhf", "reward").records
    out = tokenize_pairs(records, enc, max_len=16).arrays
    for side in ("chosen", "rejected"):
        lengths = out[f"{side}_attention_mask"].sum(axis=1)
        last = out[f"{side}_input_ids"][np.arange(2), lengths - 1]
        np.testing.assert_array_equal(last, [enc.eos_id] * 2)
        assert (out[f"{side}_input_ids"] == enc.eos_id).sum() == 2
    np.testing.assert_array_equal(
        out["chosen_input_ids"][1, : out["chosen_attention_mask"][1].sum()],
        ids(tokenizer, records[1].prompt + records[1].chosen) + [enc.eos_id],
    )


def test_packing_keeps_every_example(tokenizer):
    enc = Encoder.from_tokenizer(tokenizer)
    records = parse_rows(readers.read_rows(fixture("prompt_chosen_rejected.jsonl")), "auto", "sft").records
    plain = tokenize_sft(records, enc, max_len=24).arrays
    packed = tokenize_sft(records, enc, max_len=24, pack=True).arrays
    assert len(packed["input_ids"]) < len(plain["input_ids"])
    real = packed["segment_ids"] > 0
    np.testing.assert_array_equal(real, packed["attention_mask"] == 1)
    plain_tokens = plain["input_ids"][plain["attention_mask"] == 1]
    np.testing.assert_array_equal(np.sort(packed["input_ids"][real]), np.sort(plain_tokens))
    assert packed["loss_mask"].sum() == plain["loss_mask"].sum()
    first = packed["segment_ids"][0]
    assert first[0] == 1 and packed["positions"][0][np.argmax(first == 2)] == 0


# ---------------------------------------------------------------- iterator


def numbered(n):
    return {"input_ids": np.arange(n * 2, dtype=np.int32).reshape(n, 2), "row": np.arange(n)}


def test_iterator_epochs_cover_rows_and_restore_continues_exactly():
    it = BatchIterator(numbered(10), batch_size=4, seed=5)
    assert it.steps_per_epoch == 2
    batches = [next(it) for _ in range(5)]
    assert all(b["input_ids"].shape == (4, 2) for b in batches)
    assert len(set(np.concatenate([b["row"] for b in batches[:2]]))) == 8
    assert not np.array_equal(batches[0]["row"], batches[2]["row"])  # a new order each epoch
    resumed = BatchIterator(numbered(10), batch_size=4, seed=5)
    it = BatchIterator(numbered(10), batch_size=4, seed=5)
    next(it), next(it), next(it)
    resumed.restore(json.loads(json.dumps(it.state())))
    assert it.state() == {"epoch": 1, "index": 1}
    for _ in range(3):
        np.testing.assert_array_equal(next(resumed)["row"], next(it)["row"])
    with pytest.raises(JaxrlError, match="does not fit this dataset"):
        resumed.restore({"epoch": 0, "index": 9})


def test_sharded_processes_see_the_global_batch():
    whole = BatchIterator(numbered(12), batch_size=4, seed=1)
    shards = [BatchIterator(numbered(12), batch_size=4, seed=1).shard(p, 2) for p in range(2)]
    for _ in range(4):
        parts = [next(s) for s in shards]
        assert parts[0]["row"].shape == (2,)
        np.testing.assert_array_equal(np.concatenate([p["row"] for p in parts]), next(whole)["row"])


def test_prompt_rows_keep_their_fields_aligned_through_iterators(tmp_path, tokenizer):
    """A prompt row's scalar columns (GSM8K's `answer`) stay with its tokens: through a jsonl + parquet blend,
    a dropped over-long prompt, the shuffled iterator and its restore, and the padded evaluation pass."""
    parquet = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    words = "a b c d e f g h i j".split()
    rows = [{"prompt": f"{w} word", "answer": f"{i} {w}", "id": i, "meta": [1, 2]} for i, w in enumerate(words)]
    rows[3]["prompt"] = "long " * 9 + "word"  # dropped by max_prompt_len, and its fields with it
    write(tmp_path, "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:6]))
    parquet.write_table(pyarrow.Table.from_pylist(rows[6:]), str(tmp_path / "b.parquet"))
    records = load_records([tmp_path / "a.jsonl", tmp_path / "b.parquet"], need="prompt", seed=3).records
    arrays = tokenize_prompts(records, Encoder.from_tokenizer(tokenizer), max_prompt_len=3).arrays
    assert set(arrays) == {"input_ids", "attention_mask", "field/answer", "field/id"}  # lists are not fields
    assert sorted(arrays["field/id"]) == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    tokens_of = {i: ids(tokenizer, rows[i]["prompt"]) for i in arrays["field/id"]}

    def check(batch):
        for row, input_ids, mask in zip(batch_rows(batch), batch["input_ids"], batch["attention_mask"]):
            assert row == {"answer": rows[row["id"]]["answer"], "id": row["id"]}
            assert input_ids[mask > 0].tolist() == tokens_of[row["id"]]

    it = BatchIterator(arrays, batch_size=4, seed=5)
    for _ in range(3):  # into the second epoch
        check(next(it))
    resumed = BatchIterator(arrays, batch_size=4, seed=5)
    resumed.restore(it.state())
    a, b = next(it), next(resumed)
    check(b)
    assert batch_rows(a) == batch_rows(b)
    evals = list(BatchIterator(arrays, batch_size=4, shuffle=False, num_epochs=1, pad_last=True))
    for batch in evals:
        check(batch)
    real = [row["id"] for batch in evals for row, v in zip(batch_rows(batch), batch["valid"]) if v > 0]
    assert real == list(arrays["field/id"])  # every row once, the padding (copies of row 0) left out


def test_iterator_limits():
    assert len(list(BatchIterator(numbered(9), batch_size=3, shuffle=False, num_epochs=2))) == 6
    with pytest.raises(JaxrlError, match="3 examples, fewer than train.batch_size=4"):
        BatchIterator(numbered(3), batch_size=4)
    with pytest.raises(JaxrlError, match="multiple of the 2 processes"):
        BatchIterator(numbered(8), batch_size=3).shard(0, 2)


@pytest.mark.parametrize("n, batch, processes", [(13, 16, 1), (21, 8, 2), (16, 8, 1)])
def test_eval_batches_pad_the_tail_and_mark_every_real_row_once(n, batch, processes):
    shards = [BatchIterator(numbered(n), batch_size=batch, shuffle=False, num_epochs=1, pad_last=True)
              .shard(p, processes) for p in range(processes)]
    batches = [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]} for parts in zip(*shards)]
    assert len(batches) == -(-n // batch)
    assert all(b["row"].shape == (batch,) and b["valid"].dtype == np.float32 for b in batches)
    rows = np.concatenate([b["row"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    np.testing.assert_array_equal(rows[valid == 1], np.arange(n))  # every row once, in order
    assert valid.sum() == n and not valid[n:].any()
    # Training batches still need the whole batch: a dataset smaller than one batch stays an error.
    with pytest.raises(JaxrlError, match=f"{n} examples, fewer than train.batch_size=32"):
        BatchIterator(numbered(n), batch_size=32)


def test_real_parquet_file_reads_rows_with_their_row_numbers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jaxrl.data.formats import parse_rows
    from jaxrl.data.readers import read_rows

    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.table({"prompt": ["1+1=", "2+2=", ""], "chosen": ["2", "4", "x"], "rejected": ["3", "5", "y"]}),
                   path)
    rows = read_rows(str(path))
    assert [r.data["chosen"] for r in rows] == ["2", "4", "x"]
    with pytest.raises(JaxrlError, match=r"prefs.parquet row 2"):
        parse_rows(rows, "prompt_chosen_rejected", "reward")
    parsed = parse_rows(rows, "prompt_chosen_rejected", "reward", skip_bad_rows=True)
    assert len(parsed.records) == 2 and parsed.skipped == 1
