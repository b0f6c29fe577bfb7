"""``flowgrpo eval`` argument handling (settings from the preset, flags over the preset) and ``flowgrpo bench
eval`` on the tiny model."""

from __future__ import annotations

import argparse

import pytest

from flowgrpo.eval import cli


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="flowgrpo")
    sub = p.add_subparsers(dest="cmd", required=True)
    cli.add_parser(sub)
    return p.parse_args(["eval", *argv])


def test_add_parser_and_settings_from_the_preset():
    args = _parse("--model", "m", "--suite", "geneval,ocr", "--preset", "tiny_cpu", "--num-prompts", "5",
                  "eval.guidance_scale=3.0")
    assert args.fn is cli.cmd_eval and args.suite == "geneval,ocr" and args.overrides == ["eval.guidance_scale=3.0"]
    settings, cfg = cli._settings_and_config(args)
    # tiny_cpu: eval.num_steps 10, resolution 64, eval.batch_size 8; the override and the flag win
    assert (settings.num_steps, settings.resolution, settings.batch_size) == (10, 64, 8)
    assert settings.guidance_scale == 3.0 and settings.num_prompts == 5 and settings.device == "cpu"
    assert cfg.model.path == "tiny"
    flags = _parse("--model", "m", "--steps", "7", "--guidance", "1", "--resolution", "128", "--threads", "1",
                   "--no-overlap")
    s, cfg = cli._settings_and_config(flags)
    assert cfg is None and (s.num_steps, s.guidance_scale, s.resolution, s.threads, s.overlap) == (7, 1.0, 128, 1,
                                                                                                     False)
    assert cli._settings_and_config(_parse("--model", "m"))[0].num_steps == 40  # the paper's protocol


def test_cli_errors_are_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("FLOWGRPO_EVAL_DATA", raising=False)
    assert cli.main(["--model", "m", "--suite", "ocr", "--out", str(tmp_path / "o")]) == 2
    assert "needs a data root" in capsys.readouterr().err
    assert cli._parse_options('{"pickscore": {"device": "cpu"}}') == {"pickscore": {"device": "cpu"}}
    with pytest.raises(SystemExit):
        cli._parse_options("[1, 2]")


def test_bench_eval_reports_throughput_and_shares(tiny_model_dir):
    from flowgrpo.eval.bench import bench_eval

    out = bench_eval(str(tiny_model_dir), num_prompts=4, batch=2, steps=2, resolution=32, guidance=4.5,
                     rewards=["jpeg_compressibility"], device="cpu", max_sequence_length=16, threads=1)
    assert out["bench"] == "eval" and out["runs"]["overlap"]["images"] == 4 and out["runs"]["serial"]["images"] == 4
    assert out["images_per_s"] > 0 and out["sampler_images_per_s"] > 0
    assert out["scoring_share"] + out["sampling_share"] == pytest.approx(1.0, abs=0.002)
    assert out["overlap_speedup"] > 0
