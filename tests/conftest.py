"""Shared fixtures: tiny random models, built in code, that run in milliseconds on a CPU."""

from __future__ import annotations

import gc
import json
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing file must fail at once, not wait on the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

# Tiny models run fastest on one thread, and CI's two cores are shared with the browser test's app.
torch.set_num_threads(1)


def _freeze_what_lives_on() -> None:
    """Leave the objects that live on out of garbage collection. The run machine collects garbage after each stage,
    sample round and preview variant (to free one model before the next), and each full collection walks every
    object the collector tracks: torch, diffusers, transformers and gradio (~0.5 million objects, ~0.7 s a
    collection on CI's cores: ~10 s of a tiny run's 11 s), then the planner's cached meta models and whatever else
    the session keeps. Frozen, the collector skips them; what the tests make afterwards is freed as before. Collected
    first, so nothing unreachable is frozen with them (a frozen object that a cycle strands later stays until the
    session ends: only small, session-long things are frozen)."""
    gc.collect()
    gc.freeze()


def pytest_collection_finish(session) -> None:
    _freeze_what_lives_on()  # every test module is imported, and with it the libraries


@pytest.fixture(autouse=True, scope="module")
def _freeze_after_each_module():
    """After a module's own fixtures are gone, what is left lives on (caches, the session's fixtures): frozen too
    (a sequence of six run and planner test files: 185 s -> 114 s)."""
    yield
    _freeze_what_lives_on()


class TinyBlock(nn.Module):
    """A pre-norm transformer block (attention + MLP) with plain nn.Linear projections."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class TinyTransformer(nn.Module):
    """Embedding -> blocks -> head; inputs are token ids (batch, tokens)."""

    def __init__(self, vocab: int = 50, dim: int = 32, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


BLOCK_RULES = [(r"blocks\.\d+\.(q|k|v|o|up|down)", 0.5)]


@pytest.fixture
def tiny_transformer() -> TinyTransformer:
    torch.manual_seed(0)
    return TinyTransformer().eval()


@pytest.fixture
def token_batches() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 50, (2, 12), generator=generator)} for _ in range(4)]


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """(folder, run settings, backend settings) of a run of the trivial fake backend (tests/fake_backend.py)."""
    from fake_backend import FakeBackend, FakeSettings
    from pipelines.runner import RunSettings
    from pipelines.runner import registry

    monkeypatch.setitem(registry.BACKENDS, "fake", "fake_backend:FakeBackend")
    FakeBackend.calls, FakeBackend.fail_at_step = {}, None
    data = tmp_path / "values.json"
    data.write_text(json.dumps([0.1 * i for i in range(8)]))
    settings = RunSettings(model="fake", ratio=0.5, steps=9, rank=2, alpha=4, lr=1e-2, checkpoint_every=3, seed=7)
    return tmp_path, settings, FakeSettings(data=str(data))


# ---------------------------------------------------------------------------------------------- browser tests
CHROMIUM = "/usr/bin/chromium"  # Debian's chromium; CI installs it (.ci/run)
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def free_port():
    """A function that gives a free TCP port of 127.0.0.1, for the app a browser test serves."""
    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return port


@pytest.fixture(scope="module")
def browser():
    """Headless chromium driven by playwright, one per test module. Without Debian's chromium the test is skipped
    with the line that installs it; on CI (CI=true), where .ci/run installs it, a missing browser is a failure."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"{CHROMIUM} is missing; .ci/run installs it (apt-get install chromium)")
        pytest.skip(f"the browser tests need {CHROMIUM}: sudo apt-get update && sudo apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
