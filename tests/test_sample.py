"""experiments/sample.py: a checkpoint's text, past the model's context, in one compile, without taking the
directory's lock; bad input exits 2 with one line before the generator compiles."""

import json
import os
import shutil

import pytest

from shardgpt.cli import flags
from shardgpt.cli import sample as cli
from shardgpt.cli import train as train_cli
from shardgpt.generation.generate import Generator
from shardgpt.io.lock import DirectoryLock
from shardgpt.lab import runner

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs.\n" * 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A chars checkpoint as train.py saves it (its validation, description and Checkpointer), at steps 0
    and 1 of an untrained 1-layer gpt-pico (context 64): no train step compiles."""
    where = tmp_path_factory.mktemp("sample")
    text = where / "text.txt"
    text.write_text(TEXT)
    argv = ["--task", f"chars:{text}", "--seq", "16", "--model.n_layer=1", "--mesh", "dp=2,tp=4"]
    args = flags.parse_args(train_cli.build_parser(), [*argv, "--ckpt-dir", str(where / "ckpt")])
    job = train_cli.validate(args)
    state, _ = runner.initial_state(job.spec, job.setup)
    job.checkpointer.save(state, job.description)
    job.checkpointer.save(state.replace(step=state.step + 1), job.description)
    job.checkpointer.close()
    return where / "ckpt"


def _files(where) -> dict[str, int]:
    return {str(p.relative_to(where)): p.stat().st_size for p in where.rglob("*") if p.is_file()}


def _corrupt_copy(ckpt, where):
    """A copy of the checkpoint whose step 1 fails its checksums (the recorded one altered, as in
    test_checkpoint.py: the restore's verdict is the same as for flipped bytes)."""
    shutil.copytree(ckpt, where)
    meta = where / "1" / "meta" / "metadata"
    record = json.loads(meta.read_text())
    record["checksums"][sorted(record["checksums"])[0]] ^= 1
    meta.write_text(json.dumps(record))
    return where


def test_samples_past_the_context_in_one_compile_without_taking_the_lock(ckpt, tmp_path, capsys):
    """Two samples of 100 characters after a 70-character prompt (cropped to the context's 64) on a
    dp=2,tp=2 mesh, from the latest step that verifies (step 1's checksums fail: step 0, with a note),
    while a live writer holds the directory's lock: the reader neither waits nor touches anything."""
    corrupt = _corrupt_copy(ckpt, tmp_path / "ckpt")
    holder = DirectoryLock(corrupt).acquire()  # flock: a second acquire would fail, in this process too
    before = _files(corrupt)
    try:
        prompt = TEXT[:70]
        argv = [str(corrupt), "--prompt", prompt, "--max-new", "100", "--num-samples", "2"]
        assert cli.main([*argv, "--mesh", "dp=2,tp=2"]) == 0
        assert json.loads((corrupt / ".lock").read_text())["pid"] == os.getpid()
        assert _files(corrupt) == before
    finally:
        holder.release()
    out, err = capsys.readouterr()
    samples = out.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert len(samples) == 2 and samples[0] != samples[1], out
    for text in samples:
        assert text.startswith(prompt[-64:]) and len(text) == 64 + 100 and set(text) <= set(TEXT)
    assert err.startswith("note: step 1 does not verify, trying the one before"), err
    assert f"sampling {corrupt}/0: GPT (n_layer=1, n_head=8, n_embd=64)" in err, err
    assert "on dp=2,tp=2 (4 devices)" in err and "note: the prompt's 70 tokens exceed the context (64)" in err
    assert "200 new tokens in" in err and ", 1 compile;" in err, err


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["{missing}"], "no checkpoint directory"),
        (["{ckpt}", "--max-new", "0"], "--max-new and --num-samples must be >= 1"),
        (["{ckpt}", "--prompt", "naïve"], "characters ['ï'] do not occur in"),
        (["{ckpt}", "--step", "7"], "--step 7: no such checkpoint"),
        (["{ckpt}", "--task", "chars:{missing}"], "which is not there"),
        (["{corrupt}", "--step", "1"], "1 array(s) do not match their checksums"),
    ],
)
def test_bad_input_exits_2_with_one_line_before_compiling(ckpt, argv, reason, tmp_path, capsys, monkeypatch):
    corrupt = _corrupt_copy(ckpt, tmp_path / "corrupt") if "{corrupt}" in argv else None
    monkeypatch.setattr(Generator, "_generate", lambda *a: pytest.fail("the generator was traced"))
    paths = {"ckpt": ckpt, "missing": tmp_path / "missing", "corrupt": corrupt}
    with pytest.raises(SystemExit) as exit_:
        cli.main([arg.format(**paths) for arg in argv])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("experiments/sample.py: error: ") and reason in last, last
    if "{corrupt}" in argv:
        assert "the newest older step that verifies is 0: sample it with --step 0" in last, last


def test_a_chars_checkpoint_records_its_characters_and_refuses_another_text(ckpt, tmp_path):
    """The vocabulary is saved with the run: sampling decodes without the text file, and resuming onto a
    text whose characters differ (the same count, so the model's shapes would still fit) is refused."""
    from shardgpt.generation import tokenizer as tokenizers
    from shardgpt.io import checkpoint

    reader = checkpoint.Checkpointer(ckpt, read_only=True)
    saved = reader.description()
    reader.close()
    recorded = saved["chars"]
    assert recorded == "".join(sorted(set(TEXT)))
    gone = tokenizers.for_task(f"chars:{tmp_path / 'gone.txt'}", len(recorded), recorded)
    assert gone.decode(gone.encode(TEXT[:20])) == TEXT[:20]
    other = {**saved, "chars": recorded[:-1] + "~"}
    with pytest.raises(ValueError, match="the text's characters are not the checkpoint's"):
        train_cli.resume_notes(saved, other)
