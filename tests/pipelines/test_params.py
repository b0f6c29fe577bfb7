"""Bad pipeline arguments fail at compile / submit time with the parameter's name and the fix."""

from __future__ import annotations

import pytest

from flowgrpo.cli import main
from flowgrpo.config import ConfigError
from flowgrpo.pipeline.params import build_run_config, parse_reward_weights, validate_arguments

K8S = {"storage_root": "s3://bucket/flowgrpo"}


def _err(args: dict) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        validate_arguments(args)
    return e.value


def test_defaults_are_valid_and_the_tiny_local_run_too():
    assert validate_arguments({}) == {}
    validate_arguments({"backend": "local", "preset": "tiny_cpu", "gpus_per_node": 0, "storage_root": "/tmp/x"})


@pytest.mark.parametrize("args,field,hint", [
    ({"preset": "genevall_sd3"}, "preset", "geneval_sd3"),
    ({"reward_weights": "geneval=abc"}, "reward_weights", "a number as the weight of 'geneval'"),
    ({"reward_weights": "geneval"}, "reward_weights", "has no '='"),
    ({"reward_weights": "genevalx=1"}, "reward_weights", "reward names from"),
    ({"reward_weights": "{bad json"}, "reward_weights", "JSON object"),
    ({"reward_weights": "geneval=0"}, "reward_weights", "non-zero"),
    ({"nodes": 0}, "nodes", ">= 1"),
    ({"gpus_per_node": -1}, "gpus_per_node", ">= 0"),
    ({"backend": "slurm"}, "backend", "kubernetes"),
    ({"hf_token_secret": ""}, "hf_token_secret", "existing Kubernetes Secret"),
    ({"storage_secret": "My_Secret"}, "storage_secret", "DNS-1123"),
    ({"storage_root": "/data"}, "storage_root", "s3://"),
    ({"eval_suites": "geneval,imagenet"}, "eval_suites", "imagenet"),
    ({"promotion_rule": "min_improvement: 0.1"}, "promotion_rule", "metric"),
    ({"overrides": "train.epochs"}, "overrides", "key=value"),
    ({"overrides": "train.learning_rate=-1"}, "train.learning_rate", "> 0"),
    ({"epochs": -2}, "epochs", ">= 0"),
    ({"backend": "local", "nodes": 2, "storage_root": "/tmp/x"}, "nodes", "backend=kubernetes"),
    ({"nodes": 3, "gpus_per_node": 1}, "sample.group_size", "must divide"),
    ({"nodse": 2}, "nodse", "a parameter of the pipeline"),
    ({"tolerations": {"key": "gpu"}}, "tolerations", "JSON list"),
])
def test_bad_arguments_name_the_field(args, field, hint):
    e = _err(args)
    assert e.field_name == field and hint in str(e), str(e)


def test_reward_weights_forms():
    assert parse_reward_weights("geneval=1.0, ocr=0.5") == {"geneval": 1.0, "ocr": 0.5}
    assert parse_reward_weights('{"ocr": 2}') == {"ocr": 2.0}
    assert parse_reward_weights("") == {}
    cfg = build_run_config("tiny_cpu", "jpeg_compressibility=2,aesthetic=0", 3, "train.learning_rate=0.5")
    assert cfg.reward == {"jpeg_compressibility": 2.0, "aesthetic": 0.0}
    assert cfg.train.epochs == 3 and cfg.train.learning_rate == 0.5


def test_cli_refuses_bad_input_before_contacting_anything(capsys):
    # no KFP host listens on port 9; validation must fail first
    rc = main(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--arg", "nodes=0"])
    assert rc == 2 and "nodes" in capsys.readouterr().err
    rc = main(["pipeline", "schedule", "--host", "http://127.0.0.1:9", "--cron", "0 3 * * *", "--version-id", "v"])
    err = capsys.readouterr().err
    assert rc == 2 and "--cron" in err and "0 0 3 * * *" in err
    rc = main(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--arg", "reward_weights=geneval=x"])
    assert rc == 2 and "reward_weights" in capsys.readouterr().err
    rc = main(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--arg", "nodes=two"])
    assert rc == 2 and "nodes" in capsys.readouterr().err
    rc = main(["pipeline", "run", "--local", "--preset", "nope", "--pipeline-root", "/tmp/unused-flowgrpo"])
    assert rc == 2 and "preset" in capsys.readouterr().err


@pytest.mark.parametrize("preset,base,name", [
    ("tiny_cpu", "tiny", "flowgrpo-tiny"),
    ("shapes_cpu", "shapes", "flowgrpo-shapes"),  # what `make demo` runs: the pretrained shapes base
    ("tiny_flux_cpu", "tiny-flux", "flowgrpo-tiny-flux"),
    ("tiny_flux_kontext_cpu", "tiny-flux-kontext", "flowgrpo-tiny-flux-kontext"),
    ("tiny_qwen_image_cpu", "tiny-qwen-image", "flowgrpo-tiny-qwen-image"),
    ("tiny_qwen_image_edit_cpu", "tiny-qwen-image-edit", "flowgrpo-tiny-qwen-image-edit"),
    ("tiny_wan_cpu", "tiny-wan", "flowgrpo-tiny-wan"),
    ("geneval_sd3", "tiny", "flowgrpo-tiny"),  # a hub model cannot be fetched offline: the random tiny model
])
def test_local_runs_start_from_the_presets_offline_base_model(tmp_path, preset, base, name):
    from flowgrpo.pipeline.cli import local_arguments

    args = local_arguments(preset, tmp_path, {})
    assert (args["base_model"], args["model_name"], args["preset"]) == (base, name, preset)
    assert local_arguments(preset, tmp_path, {"base_model": "/models/x"})["base_model"] == "/models/x"
    if preset.endswith("_cpu"):  # the paper presets need their cluster's world size
        validate_arguments({k: v for k, v in args.items() if k != "tracking_uri"})


def test_the_trainer_reaches_deployed_rewards_with_client_options_only(tmp_path):
    """A deployed reward's model options (model, device) went to its server: the trainer's options for it are the
    HTTP client's (url + client settings such as timeout_s), else building the client would fail."""
    from flowgrpo.pipeline.steps import prepare_training
    from flowgrpo.rewards.base import build_reward

    url = "http://127.0.0.1:9/"
    cfg, _ = prepare_training(run_id="r1", preset="tiny_flux_kontext_cpu", reward_weights="", epochs=1,
                              overrides="reward_options.image_similarity.timeout_s=7", model_uri="/models/x",
                              reward_endpoints={"image_similarity": url}, storage_root=str(tmp_path / "store"),
                              world_size=1, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="e",
                              work_dir=str(tmp_path / "work"))
    assert cfg.reward_options["image_similarity"] == {"url": url, "timeout_s": 7}
    client = build_reward("image_similarity", **cfg.reward_options["image_similarity"])
    assert client.url == "http://127.0.0.1:9/v1/score"
