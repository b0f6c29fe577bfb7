"""Edit tasks without a model: source-image paths and loading (flowgrpo.edit), the shapes-world counting edits
(flowgrpo.eval.shapes_edit), the prompt encoder's (prompt, source) cache, and source generation from t2i prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowgrpo.edit import SourceImages, generate_sources, load_prompt_set, load_source_image, resolve_sources
from flowgrpo.eval import shapes, shapes_edit
from flowgrpo.prompts import PromptSet, load_prompts
from flowgrpo.rollout import PromptEncoder

COUNTING_EDIT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "prompts" / "counting_edit"
needs_shared = pytest.mark.skipif(not COUNTING_EDIT.is_dir(), reason=f"shared prompt data not found at {COUNTING_EDIT}")


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_relative_sources_resolve_against_the_prompt_file_or_image_root(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "a.png", np.zeros((8, 8, 3), np.uint8))
    spec = _jsonl(tmp_path / "p.jsonl", [{"prompt": "edit it", "image": "imgs/a.png"}])
    ps = load_prompt_set(str(spec), edit=True)
    assert ps.metadata[0]["image"] == str((tmp_path / "imgs" / "a.png").resolve())
    other = tmp_path / "elsewhere"
    _png(other / "imgs" / "a.png", np.zeros((8, 8, 3), np.uint8))
    ps = load_prompt_set(str(spec), image_root=str(other), edit=True)
    assert ps.metadata[0]["image"] == str((other / "imgs" / "a.png").resolve())


def test_missing_sources_fail_before_any_model_naming_the_fix(tmp_path: Path) -> None:
    spec = _jsonl(tmp_path / "p.jsonl", [{"prompt": "edit", "image": f"gen/{i}.jpg"} for i in range(5)])
    with pytest.raises(FileNotFoundError, match=r"5 source image\(s\) do not exist.*data.image_root.*make-edit-sources"):
        load_prompt_set(str(spec), edit=True)
    no_image = _jsonl(tmp_path / "q.jsonl", [{"prompt": "edit"}])
    with pytest.raises(ValueError, match=r"row 1 has no source image under 'image'"):
        load_prompt_set(str(no_image), edit=True)
    assert load_prompt_set(str(no_image)).metadata == [{"prompt": "edit"}]  # text-to-image: no source needed


def test_prompts_and_sources_on_s3_are_fetched_once_into_the_cache(s3_bucket, tmp_path, monkeypatch) -> None:
    """A PyTorchJob's pods share no disk: prompt file and sources on s3:// (relative to the prompt file's prefix, to
    data.image_root, or absolute URIs) are fetched once into $FLOWGRPO_CACHE and then read from there."""
    from flowgrpo import storage

    monkeypatch.setenv("FLOWGRPO_CACHE", str(tmp_path / "cache"))
    a, b = np.full((8, 8, 3), 10, np.uint8), np.full((6, 6, 3), 200, np.uint8)
    for key, arr in {"data/generated_images/a.png": a, "other/b.png": b}.items():
        storage.upload_file(_png(tmp_path / "src" / key, arr), f"s3://{s3_bucket}/{key}")
    rows = [{"prompt": "edit a", "image": "generated_images/a.png"},
            {"prompt": "edit a again", "image": "generated_images/a.png"},
            {"prompt": "edit b", "image": f"s3://{s3_bucket}/other/b.png"}]
    spec = f"s3://{s3_bucket}/data/train.jsonl"
    storage.write_text(spec, "".join(json.dumps(r) + "\n" for r in rows))

    ps = load_prompt_set(spec, edit=True)  # default root: the prompt file's prefix
    assert ps.prompts == ["edit a", "edit a again", "edit b"]
    paths = [Path(md["image"]) for md in ps.metadata]
    assert paths[0] == paths[1] == tmp_path / "cache" / "edit_sources" / "remote" / s3_bucket / "data" / \
        "generated_images" / "a.png"
    assert np.array_equal(np.asarray(Image.open(paths[0])), a) and np.array_equal(np.asarray(Image.open(paths[2])), b)
    # the cache serves later loads (the objects may go: nothing is downloaded again)
    storage.delete(f"s3://{s3_bucket}/data/generated_images/a.png")
    assert load_prompt_set(spec, edit=True).metadata[0]["image"] == str(paths[0])
    # an explicit data.image_root prefix; a missing object fails before any model, naming its URI
    with pytest.raises(FileNotFoundError, match=rf"s3://{s3_bucket}/elsewhere/generated_images/a.png.*image_root"):
        load_prompt_set(spec, image_root=f"s3://{s3_bucket}/elsewhere", edit=True)
    with pytest.raises(FileNotFoundError, match="data.train_prompts"):
        load_prompts(f"s3://{s3_bucket}/data/none.jsonl")


def test_load_source_image_center_crops_and_resizes(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 10:30] = (255, 0, 0)  # the centre square is red, the sides black
    img = load_source_image(_png(tmp_path / "wide.png", arr), 10)
    assert img.shape == (3, 10, 10) and img.dtype == np.float32
    assert np.allclose(img[0], 1.0, atol=1e-2) and np.allclose(img[1:], 0.0, atol=1e-2)
    loader = SourceImages(10, cache_size=1)
    t = loader([{"image": str(tmp_path / "wide.png")}, {"image": str(tmp_path / "wide.png")}])
    assert t.shape == (2, 3, 10, 10) and torch.equal(t[0], t[1])


@needs_shared
def test_shapes_edit_rows_follow_counting_edit_and_the_split() -> None:
    train, test = shapes_edit.edit_rows("train"), shapes_edit.edit_rows("test")
    upstream = json.loads((COUNTING_EDIT / "train_metadata.jsonl").read_text().splitlines()[0])
    for rows in (train, test):
        assert rows and all(set(upstream) <= set(r) for r in rows)  # upstream's keys (tag, include, ...)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}  # targets split like the shapes world
    r = next(r for r in train if r["source_count"] == 1)
    n = r["include"][0]["count"]
    assert r["prompt"].endswith(f"to {shapes.NUMBER_WORDS[n]}") and r["t2i_prompt"].startswith("a photo of a")
    assert r["exclude"] == [{"class": r["include"][0]["class"], "count": n + 1}]
    assert all(r["source_count"] != r["include"][0]["count"] for r in train + test)


def test_shapes_edit_sources_show_the_source_scene_not_the_target(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLOWGRPO_CACHE", str(tmp_path))
    ps = load_prompts("builtin:shapes_edit_test")
    assert len(ps) == len(shapes_edit.edit_rows("test"))
    for md in ps.metadata[:12]:
        path = Path(md["image"])
        assert path.is_file() and path.parent == shapes_edit.source_dir()
        img = np.asarray(Image.open(path).convert("RGB"))
        clause = md["include"][0]
        source_scene = {"include": [{**clause, "count": md["source_count"]}], "tag": "counting"}
        assert shapes.score(img, source_scene, strict=True)[0]  # the source shows its t2i scene ...
        assert not shapes.score(img, md, strict=True)[0]  # ... which fails the edit's target count
    first = Path(ps.metadata[0]["image"]).stat().st_mtime_ns
    load_prompts("builtin:shapes_edit_test")  # rendered once, then reused
    assert Path(ps.metadata[0]["image"]).stat().st_mtime_ns == first


class _FakeEditAdapter:
    """Counts encode calls; the conditioning row is (prompt length, mean of its source)."""

    edit = True

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], torch.Tensor]] = []

    def encode_prompts(self, prompts, images=None):
        assert images is not None and images.shape[0] == len(prompts)
        self.calls.append((list(prompts), images))
        return {"row": torch.stack([torch.tensor([float(len(p)), float(img.mean())]) for p, img in zip(prompts, images)])}


def test_prompt_encoder_keys_edit_rows_on_prompt_and_source(tmp_path: Path) -> None:
    a = _png(tmp_path / "a.png", np.full((8, 8, 3), 255, np.uint8))
    b = _png(tmp_path / "b.png", np.zeros((8, 8, 3), np.uint8))
    adapter = _FakeEditAdapter()
    enc = PromptEncoder(adapter, resolution=4)
    prompts = ["add one", "add one", "add one", "remove"]
    meta = [{"image": str(a)}, {"image": str(b)}, {"image": str(a)}, {"image": str(a)}]
    cond = enc(prompts, meta)
    assert enc.calls == 3 and len(adapter.calls) == 1  # (add one, a), (add one, b), (remove, a): one batch
    assert adapter.calls[0][1].shape == (3, 3, 4, 4)  # sources at the encoder's resolution
    torch.testing.assert_close(cond["row"], torch.tensor([[7.0, 1.0], [7.0, 0.0], [7.0, 1.0], [6.0, 1.0]]))
    enc(["remove"], [{"image": str(b)}])
    assert enc.calls == 4  # a new pair; the cached ones are not encoded again
    with pytest.raises(ValueError, match="one metadata row"):
        enc(["x"])
    with pytest.raises(ValueError, match="needs the resolution"):
        PromptEncoder(adapter)


@needs_shared
def test_generate_sources_writes_each_missing_image_once(tmp_path: Path) -> None:
    rows = [json.loads(ln) for ln in (COUNTING_EDIT / "train_metadata.jsonl").read_text().splitlines()[:12]]
    ps = PromptSet([r["prompt"] for r in rows], rows)
    unique = list(dict.fromkeys(r["image"] for r in rows))
    _png(tmp_path / unique[0], np.zeros((4, 4, 3), np.uint8))  # already there: kept
    seen: list[tuple[str, int]] = []

    def sample(t2i: list[str], seeds: list[int]) -> np.ndarray:
        seen.extend(zip(t2i, seeds))
        return np.stack([np.full((6, 6, 3), s % 256, np.uint8) for s in seeds])

    written = generate_sources(ps, tmp_path, sample, seed=100, batch_size=4)
    assert len(written) == len(unique) - 1 == len(seen)
    first_row = {r["image"]: r for r in reversed(rows)}
    assert [t for t, _ in seen] == [first_row[u]["t2i_prompt"] for u in unique[1:]]
    assert [s for _, s in seen] == list(range(100, 100 + len(seen)))  # distinct deterministic seeds
    assert np.asarray(Image.open(tmp_path / unique[1])).shape == (6, 6, 3)
    resolve_sources(ps, tmp_path, "counting_edit", require=True)  # now every row's source exists
    assert generate_sources(ps, tmp_path, sample) == []  # nothing left to do
    bad = PromptSet(["edit"], [{"prompt": "edit", "image": "nope.png"}])
    with pytest.raises(ValueError, match="no 't2i_prompt'"):
        generate_sources(bad, tmp_path, sample)
