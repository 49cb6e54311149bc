"""Text in and out of generation: the tokenizer a run's task implies. The characters of a chars task's text
file, GPT-2's BPE (through tiktoken, when installed) for GPT-2's vocabulary, else the token ids themselves.
"""

import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from shardgpt.training import data

GPT2_END = "<|endoftext|>"  # GPT-2's document separator (id 50256): nanoGPT's sample.py starts from it


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """Text -> ids and back; `name` says which in words, `note` what a user should know (None: nothing)."""

    name: str
    encode: Callable[[str], np.ndarray]
    decode: Callable[[Sequence[int]], str]
    default_prompt: str  # what sampling starts from without a prompt
    note: str | None = None


def for_task(spec: str | None, vocab_size: int, recorded: str | None = None) -> Tokenizer:
    """The tokenizer of task `spec` as a checkpoint records it ("chars:PATH", "bin:DIR", "sort"; None: a
    weight file, which records none) for a model reading `vocab_size` ids, a chars task's from the
    characters the checkpoint `recorded` where it did (the text file then is not needed, and a changed one
    cannot remap the ids); ValueError if it cannot be had."""
    if spec is not None and spec.startswith("chars:"):
        path = spec[len("chars:") :]
        if recorded is not None:
            return _symbols(recorded, vocab_size, f"the {len(recorded)} characters the checkpoint recorded")
        return chars(path, vocab_size)
    if vocab_size == data.GPT2_VOCAB:
        return gpt2()
    why = {
        "sort": "the sort task's digits",
        None: "weights record no task; --task chars:PATH reads a chars model's text",
    }.get(spec)
    return ids(why or f"task {spec!r} has no tokenizer shardgpt knows")


def chars(path: str, vocab_size: int) -> Tokenizer:
    """The characters of the text file a chars task trained on, sorted (data.CharTask's vocabulary)."""
    if not Path(path).is_file():
        raise ValueError(
            f"the chars task's vocabulary is the characters of {path}, which is not there (looked from "
            f"{Path.cwd()}): run where training ran, or give --task chars:PATH with the same text"
        )
    task = data.CharTask(path, seq_len=1)
    if task.vocab_size > vocab_size:
        raise ValueError(
            f"{path} now holds {task.vocab_size} distinct characters but the model reads {vocab_size} ids: "
            "the file changed since training, so its characters no longer map to the model's ids"
        )
    return _symbols(task.chars, vocab_size, f"the {task.vocab_size} characters of {path}")


def _symbols(characters: str, vocab_size: int, what: str) -> Tokenizer:
    """A chars task's tokenizer from its sorted `characters` (id i is characters[i])."""
    unknown = "\ufffd"  # an id past the characters (a model trained with a larger vocab_size)
    note = None
    if len(characters) < vocab_size:
        note = (
            f"the model reads {vocab_size} ids, {what} are {len(characters)}: the others print as {unknown}"
        )
    symbols = list(characters) + [unknown] * (vocab_size - len(characters))
    lookup = {c: i for i, c in enumerate(characters)}

    def encode(text: str) -> np.ndarray:
        unknown_chars = sorted(set(text) - set(lookup))
        if unknown_chars:
            raise ValueError(
                f"characters {unknown_chars[:10]!r} do not occur in {what}; the model cannot read them"
            )
        return np.array([lookup[c] for c in text], np.int32)

    return Tokenizer(
        what,
        encode,
        lambda ids_: "".join(symbols[i] for i in np.asarray(ids_).tolist()),
        "\n" if "\n" in characters else characters[0],
        note,
    )


def gpt2() -> Tokenizer:
    """GPT-2's BPE through tiktoken; token ids (with a note saying why) where tiktoken is missing or fails."""
    try:
        import tiktoken

        encoding = tiktoken.get_encoding("gpt2")  # its files may need fetching once: that can fail offline
    except ImportError:
        return ids("GPT-2's BPE needs tiktoken, which is not installed: pip install tiktoken", str(50256))
    except Exception as e:  # tiktoken raises what its download raised
        return ids(f"tiktoken could not load GPT-2's BPE ({type(e).__name__}: {e})", str(50256))
    return Tokenizer(
        "GPT-2's BPE (tiktoken)",
        lambda text: np.array(encoding.encode(text, allowed_special={GPT2_END}), np.int32),
        lambda ids_: encoding.decode(np.asarray(ids_).tolist()),
        GPT2_END,
    )


def ids(why: str, default_prompt: str = "0") -> Tokenizer:
    """Token ids as text: "1 2 3" (spaces or commas) in, the same out; `why` there is no better one."""

    def encode(text: str) -> np.ndarray:
        words = [w for w in re.split(r"[\s,]+", text) if w]
        if not all(re.fullmatch(r"-?\d+", w) for w in words):
            raise ValueError(f"this model's tokens are ids ({why}): give the prompt as ids, e.g. '1 2 3'")
        return np.array([int(w) for w in words], np.int32)

    return Tokenizer(
        "token ids",
        encode,
        lambda ids_: " ".join(str(i) for i in np.asarray(ids_).tolist()),
        default_prompt,
        f"tokens print as ids: {why}",
    )
