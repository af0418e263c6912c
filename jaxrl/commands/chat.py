"""`jaxrl chat`: an interactive multi-turn chat with an HF model directory, streamed token by token.

The conversation is kept as messages and rendered whole for every turn (the tokenizer's chat template,
or DeepSpeed-Chat's `Human: ...\\n\\nAssistant:` format when it has none), then prefilled into a fresh KV
cache; the reply is decoded one jitted step at a time so each token reaches the terminal as it comes.
Prompts are padded to power-of-two buckets (`jaxrl.generation.prompt_bucket`), so a conversation
compiles prefill once per bucket and the decode step once.

Commands typed at the prompt: `/reset` clears the conversation, `/exit` (or end of input) quits.
"""

from __future__ import annotations

import sys

from jaxrl.errors import JaxrlError

HELP = "type a message; /reset clears the conversation, /exit quits"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="HF model directory (with tokenizer)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="reply length cap (default: 128, at most half the model's positions)")
    parser.add_argument("--temperature", type=float, default=None, metavar="T",
                        help="sample at this temperature (default: greedy)")
    parser.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling mass")
    parser.add_argument("--system", default="", metavar="TEXT", help="a system message opening the conversation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show-prompt", action="store_true",
                        help="print each turn's rendered prompt (what the model reads) to stderr")


def run(args) -> int:
    import os

    from jaxrl.commands.generate import _eos_ids
    from jaxrl.train.build import load_tokenizer
    from jaxrl.models.hf import load_pretrained

    if not os.path.isdir(args.model):
        raise JaxrlError(f"model directory {args.model} does not exist (give an HF directory)")
    tokenizer = load_tokenizer(args.model, what="--model")
    model = load_pretrained(args.model)
    max_new = args.max_new_tokens or min(128, model.config.max_position_embeddings // 2)
    session = Chat(model, tokenizer, system=args.system, max_new_tokens=max_new,
                   eos_ids=_eos_ids(model, tokenizer), seed=args.seed, **_sampling(args))
    try:
        _loop(session, show_prompt=args.show_prompt)
    except KeyboardInterrupt:  # Ctrl-C quits quietly, like /exit
        print()
    return 0


def _loop(session: Chat, *, show_prompt: bool) -> None:
    """Reads lines from stdin until /exit or end of input; prompts only when a person is typing."""
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP)
    while True:
        if interactive:
            print("\nUser: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":  # end of input or /exit
            return
        text = line.strip()
        if text == "/reset":
            session.reset()
            print("(conversation cleared)", flush=True)
        elif text:
            if show_prompt:
                print(f"--- prompt ---\n{session.render(session.history + [user(text)])}\n--- end ---",
                      file=sys.stderr, flush=True)
            print("Assistant: ", end="", flush=True)
            session.say(text, stream=lambda piece: print(piece, end="", flush=True))
            print(flush=True)


def _sampling(args) -> dict:
    """Greedy unless --temperature is given; --top-p alone samples at temperature 1."""
    temperature = args.temperature if args.temperature is not None else 0.0 if args.top_p is None else 1.0
    return {"temperature": temperature, "top_p": 1.0 if args.top_p is None else args.top_p}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


class Chat:
    """A conversation with a model: `say(text)` streams the reply and keeps both turns in `history`.

    Args:
      model: a `Transformer`; tokenizer: its HF tokenizer.
      system: an optional system message that opens every conversation (kept across `reset`).
      max_new_tokens: reply length cap; temperature / top_p: sampling (temperature 0 = greedy).
      eos_ids: ids that end a reply; seed: the sampling seed (each turn folds in its number).
    """

    def __init__(self, model, tokenizer, *, system: str = "", max_new_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, eos_ids=(), seed: int = 0):
        import jax
        from flax import nnx

        from jaxrl.generation import sampler_config

        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.graphdef, self.params = nnx.split(model)
        self.cfg = sampler_config(model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  eos_ids=eos_ids or None)
        self.rng = jax.random.key(seed)
        self.turns = 0
        self.history: list[dict] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def render(self, messages: list[dict]) -> str:
        """The text the model continues: the chat template with a generation prompt, or the fallback."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        names = {"user": "Human", "assistant": "Assistant"}
        parts = [m["content"] if m["role"] == "system" else f"{names[m['role']]}: {m['content']}"
                 for m in messages]
        return "\n\n".join(parts + ["Assistant:"])

    def encode(self, messages: list[dict]) -> list[int]:
        """Token ids of the rendered conversation, its oldest tokens dropped if the reply would not fit."""
        text = self.render(messages)
        templated = bool(getattr(self.tokenizer, "chat_template", None))  # the template writes its own BOS
        ids = self.tokenizer(text, add_special_tokens=not templated)["input_ids"]
        room = self.model.config.max_position_embeddings - self.cfg.max_new_tokens
        if room < 1:
            raise JaxrlError(f"--max-new-tokens {self.cfg.max_new_tokens} leaves no room for a prompt in the "
                             f"model's {self.model.config.max_position_embeddings} positions; lower it")
        if len(ids) > room:
            print(f"(conversation too long: keeping its last {room} tokens; /reset starts over)", file=sys.stderr)
            ids = ids[-room:]
        return ids

    def say(self, text: str, stream=None) -> str:
        """Adds a user turn, generates the reply (calling `stream(piece)` with each new piece of text as
        tokens arrive), adds it to the history and returns it."""
        messages = self.history + [user(text)]
        reply_ids = []
        shown = ""
        for token in self._tokens(self.encode(messages)):
            reply_ids.append(token)
            now = self.tokenizer.decode(reply_ids, skip_special_tokens=True)
            if stream is not None and not now.endswith("\ufffd") and len(now) > len(shown):
                stream(now[len(shown):])  # a multi-byte character shows once all its tokens are in
                shown = now
        reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True).strip()
        self.history = messages + [{"role": "assistant", "content": reply}]
        self.turns += 1
        return reply

    def _tokens(self, prompt: list[int]):
        """Yields the reply's token ids one by one (EOS excluded): prefill, then one decode step each."""
        import jax

        from jaxrl.generation import decode_step, pad_prompts, prefill, prompt_bucket

        cfg, mc = self.cfg, self.model.config
        ids, mask = pad_prompts([prompt], prompt_bucket(len(prompt), mc.max_position_embeddings - cfg.max_new_tokens),
                                1, cfg.pad_id)
        state = prefill(self.graphdef, self.params, ids, mask, jax.random.fold_in(self.rng, self.turns), cfg=cfg)
        while True:
            token, done, step = jax.device_get((state.last[0], state.done[0], state.step))
            if done:  # the token just sampled is an EOS
                return
            yield int(token)
            if step >= cfg.max_new_tokens:
                return
            state = decode_step(self.graphdef, self.params, state, cfg=cfg)
