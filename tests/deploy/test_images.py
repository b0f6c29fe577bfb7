"""Static checks of images/: the Dockerfiles (a small line parser), the build context (.dockerignore), the
pinned requirements and the image names the pipeline refers to. Nothing is built here (no Docker engine)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest

from components import images as image_refs
from flowgrpo.k8s.objects import CACHE_ENV
from tests.deploy.conftest import IMAGES, ROOT

DOCKERFILES = sorted(IMAGES.glob("*/Dockerfile"))
#: Dockerfile directory -> the image name it builds (components/images.py names the first three)
IMAGE_NAMES = {"pipeline": "flowgrpo-components", "trainer": "flowgrpo-trainer",
               "reward-server": "flowgrpo-reward-server", "mlflow": "flowgrpo-mlflow"}
#: images whose processes run flowgrpo (the cluster runs them with a read-only root and /tmp as emptyDir)
FLOWGRPO_IMAGES = {"pipeline", "trainer", "reward-server"}


# ------------------------------------------------------------------------------------------ the parser
@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse(path: Path) -> tuple[list[tuple[str, str]], list[Stage]]:
    """(instructions before the first FROM, stages): each instruction as (KEYWORD, arguments), with
    continuation lines joined and comments dropped."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, f"{path}: dangling line continuation"
    preamble: list[tuple[str, str]] = []
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert m, f"{path}: cannot parse FROM {args}"
            stages.append(Stage(base=m[1], name=m[2] or ""))
        elif stages:
            stages[-1].instructions.append((keyword, args))
        else:
            preamble.append((keyword, args))
    return preamble, stages


def key_values(args: str) -> dict[str, str]:
    """``KEY=VALUE ...`` (LABEL, ENV) with shell-style quoting."""
    out = {}
    for token in shlex.split(args):
        key, sep, value = token.partition("=")
        assert sep, f"not KEY=VALUE: {token!r}"
        out[key] = value
    return out


def final_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        env.update(key_values(args))
    return env


# ---------------------------------------------------------------------------------------- .dockerignore
def _pattern(p: str) -> re.Pattern[str]:
    parts = []
    for segment in p.strip("/").split("/"):
        if segment == "**":
            parts.append(".*")
        else:
            parts.append("".join("[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch) for ch in segment))
    return re.compile("/".join(parts).replace(".*/", "(?:.*/)?"))


def dockerignored(path: str, rules: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins; ``!``
    re-includes."""
    excluded = False
    for rule in rules:
        negate = rule.startswith("!")
        regex = _pattern(rule[1:] if negate else rule)
        parts = path.split("/")
        if any(regex.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def _dockerignore_rules() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


# --------------------------------------------------------------------------------------------- tests
def test_every_image_has_a_dockerfile() -> None:
    assert {p.parent.name for p in DOCKERFILES} == set(IMAGE_NAMES)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfile_is_hardened_and_pinned(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert not re.search(r":latest\b", text, re.I), "no :latest anywhere"
    preamble, stages = parse(dockerfile)
    assert [kw for kw, _ in preamble] == [], "ARGs before FROM would make the base image a variable"
    names = [s.name for s in stages]
    assert all(names) and len(set(names)) == len(names), "every stage is named, once"
    for stage in stages:
        if stage.base in names[: names.index(stage.name)]:
            continue  # built on an earlier stage
        assert "$" not in stage.base, f"base {stage.base} is not a literal"
        m = re.fullmatch(r"[\w.\-/:]+?:([\w.\-]+)(@sha256:[0-9a-f]{64})?", stage.base)
        assert m and m[1].lower() != "latest", f"base {stage.base} is not pinned to a tag"
        assert re.search(r"\d", m[1]), f"base {stage.base}: the tag names no version"
    final = stages[-1]
    assert final.name == "runtime"
    users = final.all("USER")
    assert users, "the final stage sets USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) >= 10000, f"USER {users[-1]}: a numeric, non-root, high uid"
    assert [kw for kw, _ in final.instructions if kw in ("USER", "RUN")][-1] == "USER", "nothing runs after USER"
    labels: dict[str, str] = {}
    for args in final.all("LABEL"):
        labels.update(key_values(args))
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.revision"] == "${GIT_SHA}"
    assert labels["org.opencontainers.image.title"] == IMAGE_NAMES[dockerfile.parent.name]
    for label in ("org.opencontainers.image.description", "org.opencontainers.image.licenses"):
        assert labels.get(label), label
    args = {a.split("=")[0] for a in final.all("ARG")}
    assert {"VERSION", "GIT_SHA"} <= args
    assert final.all("HEALTHCHECK"), "HEALTHCHECK (or HEALTHCHECK NONE where none makes sense)"
    assert not [kw for kw, _ in final.instructions if kw in ("ADD", "MAINTAINER")]
    assert not re.search(r"\bsudo\b|--allow-unauthenticated|--trusted-host|--no-check-certificate|curl\s+-k\b", text)
    assert final.all("WORKDIR") and all(w.startswith("/") for w in final.all("WORKDIR"))
    # every pip install installs pinned requirements (a -r file from images/requirements or an exact version)
    for stage in stages:
        for run in stage.all("RUN"):
            for install in re.findall(r"pip install ([^&;]*)", run):
                for token in shlex.split(install):
                    if token.startswith("-") or token.startswith("/") or "://" in token:
                        continue
                    assert "==" in token, f"unpinned pip requirement {token!r} in {dockerfile}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_runtime_environment(dockerfile: Path) -> None:
    """HOME and every cache under /tmp (the emptyDir of the read-only pods; the same paths as CACHE_ENV),
    the venv first on PATH (torchrun, flowgrpo, python3 for KFP's components)."""
    _, stages = parse(dockerfile)
    env = final_env(stages[-1])
    assert env["HOME"] == "/tmp"
    assert env["PATH"].split(":")[0] == "/opt/venv/bin"
    assert stages[-1].all("WORKDIR")[-1] == "/tmp"
    if dockerfile.parent.name in FLOWGRPO_IMAGES:
        for key, value in CACHE_ENV.items():
            assert env[key] == value, key
        assert env["TORCH_HOME"].startswith("/tmp/")
        assert env["FLOWGRPO_ROOT"] == "/opt/flowgrpo"  # configs/, components/, pipelines/ for the steps
        copies = " ".join(stages[0].all("COPY") + [c for s in stages for c in s.all("COPY")])
        for needed in ("flowgrpo", "configs", "pyproject.toml"):
            assert needed in copies


def test_entrypoints() -> None:
    def final(name: str) -> Stage:
        return parse(IMAGES / name / "Dockerfile")[1][-1]

    assert json.loads(final("reward-server").all("ENTRYPOINT")[-1]) == ["flowgrpo", "serve-reward"]
    assert "EXPOSE" in {kw for kw, _ in final("reward-server").instructions}
    # the PyTorchJob and KFP set the command; no ENTRYPOINT may get in their way
    assert final("trainer").all("ENTRYPOINT") == [] and final("pipeline").all("ENTRYPOINT") == []
    assert json.loads(final("mlflow").all("ENTRYPOINT")[-1]) == ["mlflow", "server"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_copied_files_exist_and_are_in_the_build_context(dockerfile: Path) -> None:
    rules = _dockerignore_rules()
    _, stages = parse(dockerfile)
    families = {p.stem.removeprefix("reward-") for p in (IMAGES / "requirements").glob("reward-*.txt")}
    for stage in stages:
        for args in stage.all("COPY"):
            if args.startswith("--from="):
                continue
            *sources, _dest = shlex.split(args)
            for src in sources:
                expanded = [src.replace("${REWARD_FAMILY}", f) for f in families] if "${" in src else [src]
                for path in expanded:
                    assert (ROOT / path).exists(), f"COPY {path}: missing"
                    probe = path if (ROOT / path).is_file() else f"{path}/__init__.py"
                    assert not dockerignored(probe, rules), f"COPY {path}: excluded by .dockerignore"


def test_dockerignore_keeps_local_state_out() -> None:
    rules = _dockerignore_rules()
    for path in (".venv/bin/python", "runs/demo/x.json", ".cache/checkov-venv/bin/checkov", ".git/HEAD",
                 "flowgrpo/__pycache__/cli.cpython-311.pyc", "flowgrpo.egg-info/PKG-INFO", "tests/k8s/conftest.py"):
        assert dockerignored(path, rules), path
    for pattern in (".venv", "runs", ".cache", ".git"):
        assert pattern in rules, f".dockerignore names {pattern} explicitly"
    for path in ("pyproject.toml", "README.md", "flowgrpo/cli.py", "configs/tiny_cpu.yaml",
                 "components/images.py", "pipelines/flow_grpo.yaml", "images/requirements/trainer.txt"):
        assert not dockerignored(path, rules), path


def test_requirements_are_pinned() -> None:
    # Not compared with .venv here: a clean install may resolve newer releases than the committed pins, and
    # CI must not break when PyPI publishes one. `make images-check` runs `pin_requirements.py --check`.
    for path in (IMAGES / "requirements").glob("*.txt"):
        for line in path.read_text().splitlines():
            if line and not line.startswith("#"):
                assert re.fullmatch(r"[a-z0-9][a-z0-9.\-]*==[\w.+!\-]+", line), f"{path.name}: {line}"
    # torch: the Dockerfiles' TORCH_VERSION is the version the tests run with
    torch = metadata.version("torch").split("+")[0]
    for name in ("trainer", "reward-server", "pipeline"):
        _, stages = parse(IMAGES / name / "Dockerfile")
        (build,) = [s for s in stages if s.name == "build"]
        assert f"TORCH_VERSION={torch}" in build.all("ARG"), name
    # kfp's exact pins hold in every image that has kfp
    for name in ("trainer", "pipeline"):
        pins = dict(line.split("==") for line in (IMAGES / "requirements" / f"{name}.txt").read_text().splitlines()
                    if "==" in line)
        assert pins["kfp"].startswith("2.17.") and pins["requests"] == "2.33.0"  # kfp 2.17 pins requests exactly
    ocr = (IMAGES / "requirements" / "reward-ocr.txt").read_text()
    geneval = (IMAGES / "requirements" / "reward-geneval.txt").read_text()
    assert "rapidocr-onnxruntime==" in ocr and "transformers==" not in ocr
    assert "transformers==" in geneval and "opencv-python==" not in geneval


def test_image_names_match_the_pipelines_references() -> None:
    """components/images.py stays the single source: its names are the Dockerfiles' titles and the tags
    `make images` builds."""
    makefile = (IMAGES / "Makefile.images").read_text()
    for ref, dockerfile in ((image_refs.COMPONENT_IMAGE, "pipeline"), (image_refs.TRAINER_IMAGE, "trainer"),
                            (image_refs.REWARD_IMAGE, "reward-server")):
        registry, _, name_tag = ref.rpartition("/")
        name, _, tag = name_tag.partition(":")
        assert registry == image_refs.REGISTRY and tag == image_refs.VERSION
        assert IMAGE_NAMES[dockerfile] == name
        assert f"{name}:$(VERSION)" in makefile, f"make images does not tag {name}"
        assert f"images/{dockerfile}/Dockerfile" in makefile
    assert re.search(r"^images:", makefile, re.M) and "docker" in makefile.lower() and "PUSH" in makefile
