"""The synthetic addition task: rows, split, checker, files and tokenizer."""
import json

import pytest

from jaxrl.data import synthetic
from jaxrl.errors import JaxrlError


@pytest.fixture(scope="module")
def tokenizer():
    return synthetic.build_tokenizer()


@pytest.mark.parametrize("kind", synthetic.KINDS)
def test_rows_are_deterministic_by_seed(kind):
    rows = synthetic.make_task_rows(200, seed=3, kind=kind)
    assert rows == synthetic.make_task_rows(200, seed=3, kind=kind)
    assert rows != synthetic.make_task_rows(200, seed=4, kind=kind)


def test_rows_have_the_normalised_format():
    assert set(synthetic.make_task_rows(1, seed=0, kind="sft")[0]) == {"prompt", "response"}
    assert set(synthetic.make_task_rows(1, seed=0, kind="preference")[0]) == {"prompt", "chosen", "rejected"}
    assert set(synthetic.make_task_rows(1, seed=0, kind="prompt")[0]) == {"prompt"}


def test_train_and_held_out_problems_never_overlap():
    def problems(held_out, seed):
        rows = synthetic.make_task_rows(20_000, seed=seed, kind="prompt", held_out=held_out)
        # Unordered, so that "a+b=" in one split and "b+a=" in the other also counts as overlap.
        return {frozenset(r["prompt"][:-1].split("+")) for r in rows}

    train, held_out = problems(False, seed=0), problems(True, seed=1)
    assert not train & held_out
    # 20k draws cycle through each whole side, so together they must cover every pair below 100.
    assert len(train | held_out) == 100 * 101 // 2
    assert 0.15 < len(held_out) / len(train | held_out) < 0.25


def test_eval_prompts_are_distinct_until_the_pool_is_used_up():
    prompts = [r["prompt"] for r in synthetic.make_task_rows(1000, seed=0, kind="prompt", held_out=True)]
    assert len(set(prompts)) == len(prompts)


def test_checker_accepts_chosen_and_rejects_every_rejected():
    rows = synthetic.make_task_rows(3000, seed=0, kind="preference")
    assert all(synthetic.check(r["prompt"], r["chosen"]) for r in rows)
    assert not any(synthetic.check(r["prompt"], r["rejected"]) for r in rows)
    assert all(r["rejected"].isdigit() and r["rejected"] != r["chosen"] for r in rows)


def test_checker_strips_eos_and_whitespace_but_matches_exactly():
    assert synthetic.check("37+45=", "82")
    assert synthetic.check("37+45=", " 82<eos>")
    assert synthetic.check("37+45=", "82<eos><pad><pad>")
    assert synthetic.check("1+2=3<eos>37+45=", "82")  # the last problem in a chat history counts
    assert not synthetic.check("37+45=", "082")
    assert not synthetic.check("37+45=", "8 2")
    assert not synthetic.check("37+45=", "")
    with pytest.raises(JaxrlError, match="no addition problem"):
        synthetic.check("hello", "82")


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_sft_noise_sets_the_share_of_wrong_answers(noise):
    rows = synthetic.make_task_rows(4000, seed=0, kind="sft", sft_noise=noise)
    accuracy = synthetic.task_accuracy([r["prompt"] for r in rows], [r["response"] for r in rows])
    assert accuracy == pytest.approx(1.0 - noise, abs=0.03)


def test_task_accuracy_and_its_errors():
    assert synthetic.task_accuracy(["1+1=", "2+2=", "3+3=", "4+4="], ["2", "5", "6<eos>", "7"]) == 0.5
    with pytest.raises(JaxrlError, match="2 prompts but 1 responses"):
        synthetic.task_accuracy(["1+1=", "2+2="], ["2"])
    with pytest.raises(JaxrlError, match="no prompts"):
        synthetic.task_accuracy([], [])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "dpo"}, "kind='dpo'"),
        ({"seed": -1}, "seed=-1"),
        ({"sft_noise": 1.0}, "sft_noise=1.0"),
        ({"max_operand": 5}, "max_operand=5"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(JaxrlError, match=match):
        synthetic.make_task_rows(4, **{"seed": 0, **kwargs})


def test_write_dataset_files(tmp_path):
    sizes = {"sft": 30, "preference": 20, "prompt": 10, "eval": 5}
    paths = synthetic.write_dataset_files(tmp_path, seed=0, sizes=sizes)
    assert set(paths) == set(synthetic.DATASET_FILES)
    rows = {k: [json.loads(line) for line in p.read_text().splitlines()] for k, p in paths.items()}
    assert {k: len(v) for k, v in rows.items()} == sizes
    assert rows["sft"] == synthetic.make_task_rows(30, seed=0, kind="sft")
    assert rows["eval"] == synthetic.make_task_rows(5, seed=0, kind="prompt", held_out=True)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(JaxrlError, match="unknown dataset size key"):
        synthetic.write_dataset_files(tmp_path, seed=0, sizes={"train": 3})


def test_tokenizer_round_trips_task_text(tokenizer):
    texts = ["37+45=", "82", "0+0=0", "999+1=1000", " 12 + 3 =\n"]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text)  # one token per character, nothing added
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer("7<eos>")["input_ids"]) == "7<eos>"
    assert tokenizer("7<eos>")["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer("x")["input_ids"] == [tokenizer.unk_token_id]


def test_tokenizer_special_tokens(tokenizer):
    ids = [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    assert len(set(ids)) == 4 and None not in ids
    assert len(tokenizer) < 64
    assert tokenizer.model_max_length == 32


def test_tokenizer_saves_and_loads_back_with_its_chat_template(tmp_path):
    from transformers import AutoTokenizer

    synthetic.build_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded("37+45=82")["input_ids"] == synthetic.build_tokenizer()("37+45=82")["input_ids"]
    assert loaded.pad_token == "<pad>" and loaded.eos_token == "<eos>"
    assert loaded.pad_token_id != loaded.eos_token_id
    chat = [{"role": "user", "content": "37+45="}]
    assert loaded.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == "37+45="
    chat += [{"role": "assistant", "content": "82"}, {"role": "user", "content": "1+2="}]
    assert loaded.apply_chat_template(chat, tokenize=False) == "37+45=82<eos>1+2="
