"""Shared fixtures: small volumes written to disk, copies of the app, one thread per test process;
and the ``integration`` marker on every test under ``tests/integration/``.

The helpers the tests import (``blob_case``, ``write_nifti``, ``constant_oar_model``, ``CodePayload``,
the server helpers) live in :mod:`contourcl.testing`, a real module: a test imports nothing from
this file.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from contourcl.testing import REPO, blob_case, sandbox, write_nifti

torch.set_num_threads(1)

INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config, items):
    """Every test under ``tests/integration/`` is marked ``integration`` (``-m "not integration"``
    leaves them out)."""
    for item in items:
        if INTEGRATION in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def app_sandbox():
    """:func:`contourcl.testing.sandbox` on this checkout: ``app_sandbox(base, weights=(...),
    studies=True, studies_ignore=...)`` copies ``apps/radonc`` to ``base/radonc`` (with the named
    weights only) and ``sample-data`` to ``base/studies``; returns (app, studies). Session-scoped,
    so fixtures of any scope can use it."""
    return partial(sandbox, repo=REPO)


@pytest.fixture
def blob_files(tmp_path):
    """Paths of a tiny image/label pair on disk and their affine."""
    ct, lab, affine = blob_case()
    return write_nifti(tmp_path / "ct.nii.gz", ct, affine), write_nifti(tmp_path / "lab.nii.gz", lab, affine), affine


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """A studies folder of three small synthetic phantoms (64 x 64 x 24 at 4 x 4 x 8 mm), labeled."""
    from contourcl.data.phantom import write_phantom

    root = tmp_path_factory.mktemp("phantoms")
    for i in range(3):
        write_phantom(root, f"case{i}", i, shape=(64, 64, 24), spacing=(4.0, 4.0, 8.0))
    return root
