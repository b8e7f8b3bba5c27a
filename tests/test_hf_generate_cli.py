"""`adsc generate` (adsc_ext.hf.generate_cli) on the built-in random model."""

import argparse

import pytest

pytest.importorskip("transformers")

from adsc_ext.hf import generate_cli  # noqa: E402


def _args(*argv):
    p = argparse.ArgumentParser()
    generate_cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_random_model_prints_answer_times_and_cache(capsys):
    assert generate_cli.run(_args("--random", "--max-new-tokens", "3", "--prompt", "hi")) == 0
    out = capsys.readouterr().out
    assert "answer:" in out and "prefill:" in out and "decode:" in out
    assert "total KV bytes" in out
    rows = [l.split() for l in out.splitlines() if l.strip()[:1].isdigit()]
    adsc_tok = [int(r[2]) for r in rows]
    base_tok = [int(r[3]) for r in rows]
    assert len(rows) == 8 and adsc_tok[0] == base_tok[0] and adsc_tok[-1] < adsc_tok[2] < base_tok[2]


def test_bad_schedule_and_missing_image_are_one_line_errors(capsys):
    assert generate_cli.run(_args("--schedule", "9:2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "8 decoder layers" in err[0]
    assert generate_cli.run(_args("--image", "/no/such/file.png")) == 2
    assert "no such file" in capsys.readouterr().err
