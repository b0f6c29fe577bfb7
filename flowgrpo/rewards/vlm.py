"""VLM-judge rewards through an OpenAI-compatible chat-completions server (sglang, vLLM, ...):

* ``unifiedreward``: UnifiedReward-7b-v1.5 rates caption alignment + image quality and ends with
  ``Final Score: x`` (1–5) ⇒ x/5.
* ``qwenvl``: Qwen2.5-VL-7B-Instruct grades aesthetics on a 1–5 rubric and answers ``<Score>k</Score>`` ⇒ k/5.

Each image is resized to ``image_size``² (512 default, bicubic), PNG-encoded and sent as a base64 ``data:`` URL in
an ``image_url`` content part followed by the text prompt, with ``temperature`` 0. Requests for a batch run
concurrently in a thread pool (``max_workers``), each with a ``timeout`` (seconds) and up to ``retries`` retries
(exponential backoff from ``backoff`` s) on connection errors, timeouts, HTTP 429 and 5xx. Other HTTP errors (a wrong
model name, a bad request) fail at once. When a request still fails, the call raises :class:`VlmEndpointError`
naming the URL (a training step must not silently score 0 because the judge is down).

Parsing (``details[i]["raw"]`` always holds the model's answer text):

* the **last** match of the score pattern is used (a reasoning model may quote the format earlier);
* a score in [1, 5] (decimals allowed, e.g. ``Final Score: 3.5`` ⇒ 0.7) gives score/5;
* a number outside [1, 5] is **not** clamped: it scores 0 with ``details["reason"] = "out of range"``;
* no match scores 0 with ``details["reason"] = "unparsable"``.

Options: ``base_url`` (default ``http://127.0.0.1:17140/v1``; ``url`` is reserved for the reward-server client),
``model`` (the served model name), ``api_key_env`` (name of the environment variable holding the API key, default
``FLOWGRPO_VLM_API_KEY``; sent as ``Authorization: Bearer ...`` when set, never logged or put in details),
``image_size``, ``max_tokens``, ``temperature``, ``timeout``, ``retries``, ``backoff``, ``max_workers``,
``prompt_template`` (``{prompt}`` is replaced by the caption; unifiedreward only). Nothing is contacted at
construction. Stateless per call, so an instance is safe to share between threads.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from flowgrpo.rewards.base import RewardOutput, as_uint8, register

DEFAULT_BASE_URL = "http://127.0.0.1:17140/v1"
DEFAULT_API_KEY_ENV = "FLOWGRPO_VLM_API_KEY"

# Our own wording. UnifiedReward was trained to end its judgement with "Final Score: <1-5>", so the prompt asks
# for exactly that closing line.
UNIFIEDREWARD_PROMPT = (
    "You are judging an image that a text-to-image model generated from the caption below.\n"
    "Caption: {prompt}\n\n"
    "Judge two things:\n"
    "1. Alignment: does the image contain every object, attribute, count, relation and piece of text the caption "
    "asks for? List the caption's key elements and say for each whether the image shows it.\n"
    "2. Quality: is the image sharp, coherent and free of distortions, artifacts and malformed anatomy, "
    "and is it pleasing to look at?\n\n"
    "Weigh both into one overall rating from 1 (poor) to 5 (excellent). After your brief reasoning, end with a "
    "line of the exact form\n"
    "Final Score: <rating>"
)

QWENVL_PROMPT = (
    "Rate the aesthetic quality of this image on a scale from 1 to 5, using this rubric:\n"
    "1 - very poor: badly composed, distorted or broken, unpleasant colors or lighting.\n"
    "2 - poor: noticeable flaws in composition, detail or color; looks amateurish.\n"
    "3 - average: acceptable but unremarkable; minor flaws.\n"
    "4 - good: well composed, clean details, harmonious colors and lighting.\n"
    "5 - excellent: striking, professional-grade composition, detail, color and lighting.\n"
    "Consider composition, color harmony, lighting, detail and overall visual appeal; ignore what the image "
    "depicts. Reply with the rating only, as <Score>k</Score> where k is an integer from 1 to 5."
)

_NUM = r"([-+]?\d+(?:\.\d+)?)"
FINAL_SCORE_RE = re.compile(r"final\s*score\s*[:：]\s*\**\s*" + _NUM, re.IGNORECASE)
TAG_SCORE_RE = re.compile(r"<\s*score\s*>\s*" + _NUM + r"\s*<\s*/\s*score\s*>", re.IGNORECASE)


class VlmEndpointError(RuntimeError):
    """The chat-completions endpoint could not be used (unreachable, timed out, HTTP error, bad response)."""


def parse_score(text: str | None, pattern: re.Pattern, low: float = 1.0, high: float = 5.0) -> tuple[float, dict]:
    """(score in [0, 1], details) from a judge answer: the last ``pattern`` match ``x`` in [low, high] gives
    x/high; out of range or no match gives 0 (see the module docstring)."""
    details: dict[str, Any] = {"raw": text}
    matches = pattern.findall(text or "")
    if not matches:
        details["reason"] = "unparsable"
        return 0.0, details
    value = float(matches[-1])
    details["value"] = value
    if not (low <= value <= high):
        details["reason"] = "out of range"
        return 0.0, details
    return value / high, details


def encode_image(image: np.ndarray, size: int | None = 512) -> str:
    """uint8 [H, W, 3] -> ``data:image/png;base64,...`` (resized to size x size with bicubic filtering first)."""
    from PIL import Image

    im = Image.fromarray(image)
    if size and im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ChatClient:
    """Minimal OpenAI-compatible ``POST {base_url}/chat/completions`` client (stdlib only)."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = DEFAULT_API_KEY_ENV,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 1.0):
        self.base_url = base_url.rstrip("/")
        self.endpoint = self.base_url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def complete(self, content: list[dict], temperature: float = 0.0, max_tokens: int = 512) -> str:
        """Send one user message with ``content`` parts; return the assistant's text."""
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": temperature,
            "max_tokens": max_tokens,
        }).encode()
        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.endpoint, data=body, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read()[:500].decode("utf-8", "replace") if e.fp is not None else ""
                last = f"HTTP {e.code}: {detail}"
                if e.code == 429 or e.code >= 500:
                    continue
                raise VlmEndpointError(f"VLM endpoint {self.endpoint} (model {self.model!r}) refused the request: "
                                       f"{last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(e).__name__}: {reason}"
                continue
            except json.JSONDecodeError as e:
                raise VlmEndpointError(f"VLM endpoint {self.endpoint} returned invalid JSON: {e}") from None
            try:
                text = payload["choices"][0]["message"]["content"]
            except (KeyError, IndexError, TypeError):
                raise VlmEndpointError(f"VLM endpoint {self.endpoint} returned an unexpected response: "
                                       f"{str(payload)[:300]}") from None
            if isinstance(text, list):  # content parts
                text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
            return text or ""
        raise VlmEndpointError(f"VLM endpoint {self.endpoint} (model {self.model!r}) failed after "
                               f"{self.retries + 1} attempts: {last}")


class _VlmReward:
    name = "vlm"
    default_model = ""
    pattern: re.Pattern = FINAL_SCORE_RE
    default_max_tokens = 512

    def __init__(self, base_url: str = DEFAULT_BASE_URL, model: str | None = None,
                 api_key_env: str | None = DEFAULT_API_KEY_ENV, image_size: int = 512, max_tokens: int | None = None,
                 temperature: float = 0.0, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
                 max_workers: int = 16, prompt_template: str | None = None, batch_size: int | None = None):
        self.client = ChatClient(base_url, model or self.default_model, api_key_env, timeout, retries, backoff)
        self.image_size = int(image_size)
        self.max_tokens = int(max_tokens or self.default_max_tokens)
        self.temperature = float(temperature)
        self.max_workers = max(1, int(max_workers))
        self.prompt_template = prompt_template
        self.batch_size = batch_size  # accepted for a uniform interface; concurrency is max_workers

    def build_text(self, prompt: str) -> str:
        raise NotImplementedError

    def _one(self, image: np.ndarray, prompt: str) -> tuple[float, dict]:
        content = [
            {"type": "image_url", "image_url": {"url": encode_image(image, self.image_size)}},
            {"type": "text", "text": self.build_text(prompt)},
        ]
        text = self.client.complete(content, temperature=self.temperature, max_tokens=self.max_tokens)
        return parse_score(text, self.pattern)

    def __call__(self, images: Any, prompts: Sequence[str], metadata: Sequence[dict] = ()) -> RewardOutput:
        images = as_uint8(images)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        if len(images) == 0:
            return RewardOutput(np.zeros(0), [])
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(images))) as pool:
            results = list(pool.map(self._one, list(images), list(prompts)))
        return RewardOutput(np.asarray([r[0] for r in results], dtype=np.float64), [r[1] for r in results])


@register("unifiedreward")
class UnifiedReward(_VlmReward):
    """Caption alignment + quality judged by UnifiedReward; ``Final Score: x`` ⇒ x/5 (0 if unparsable)."""

    name = "unifiedreward"
    default_model = "CodeGoat24/UnifiedReward-7b-v1.5"
    pattern = FINAL_SCORE_RE
    default_max_tokens = 1024

    def build_text(self, prompt: str) -> str:
        return (self.prompt_template or UNIFIEDREWARD_PROMPT).replace("{prompt}", prompt)


@register("qwenvl")
class QwenVLAesthetic(_VlmReward):
    """Aesthetic rubric judged by Qwen2.5-VL; ``<Score>k</Score>`` ⇒ k/5 (0 if unparsable)."""

    name = "qwenvl"
    default_model = "Qwen/Qwen2.5-VL-7B-Instruct"
    pattern = TAG_SCORE_RE
    default_max_tokens = 64

    def build_text(self, prompt: str) -> str:
        return (self.prompt_template or QWENVL_PROMPT).replace("{prompt}", prompt)


__all__ = ["ChatClient", "FINAL_SCORE_RE", "QWENVL_PROMPT", "QwenVLAesthetic", "TAG_SCORE_RE", "UNIFIEDREWARD_PROMPT",
           "UnifiedReward", "VlmEndpointError", "encode_image", "parse_score"]
