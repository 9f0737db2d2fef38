"""Helpers of the tests (unit and integration alike) that need the serving layer: a copy of the app
with a model history, and what a consistent model store is. ``contourcl.testing`` holds the rest;
it is core and may not import ``contourcl.serving`` (tests/unit/test_architecture.py)."""

from __future__ import annotations

from pathlib import Path

from contourcl.files import sha256_file
from contourcl.serving.model_store import ModelStore
from contourcl.testing import head_bias, sandbox, tiny_model_file


def app_with_history(base: str | Path, tmp: str | Path) -> Path:
    """A copy of the app (no weights, no studies) whose oar model has a history: v0 (head bias 0,
    the model served before), v1 (bias 1, published and served)."""
    app, _ = sandbox(base, weights=(), studies=False)
    store = ModelStore(app / "model", "oar")
    tiny_model_file(store.served, "oar", bias=0.0)
    store.consider(tiny_model_file(Path(tmp) / "cand.pt", "oar", bias=1.0), 0.6, 0.5)
    assert head_bias(store.served) == 1.0
    return app


def model_archives(store) -> dict[str, bytes]:
    """``{file name: bytes}`` of a model store's archived versions."""
    return {p.name: p.read_bytes() for p in sorted(store.root.glob("v*.pt"))}


def check_store_consistent(store, before: dict[str, bytes]) -> None:
    """The served file is recorded by sha256, no archive of ``before`` was overwritten, every archive
    has one entry, no version number is used twice, and every entry can be restored."""
    served = store.served_entry()
    assert served is not None and served["sha256"] == sha256_file(store.served)
    after = model_archives(store)
    assert all(after[name] == data for name, data in before.items()), "an archived file was overwritten"
    entries = store.entries()
    assert sorted(e["file"] for e in entries) == sorted(after), "every archived file has exactly one entry"
    assert len({e["version"] for e in entries}) == len(entries), "a version number was used twice"
    for e in entries:
        assert store.restore(e["version"])["version"] == e["version"]
        assert store.served.read_bytes() == (store.root / e["file"]).read_bytes()
        assert store.served_entry()["version"] == e["version"]
