"""`patch_on_import`: the worker setup hook patches Serve's replica module only where it is imported."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cluster.platform.runtime import patch_on_import


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A package `probe_pkg` with a submodule `target` defining `VALUE = 1`, importable, not imported."""
    root = tmp_path / "probe_pkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "target.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "probe_pkg.target"
    for name in ("probe_pkg.target", "probe_pkg"):
        sys.modules.pop(name, None)


def _double(module) -> None:
    module.VALUE *= 2


def test_patches_a_module_when_it_is_imported_not_before(package: str) -> None:
    finders = list(sys.meta_path)
    patch_on_import(package, _double)
    assert package not in sys.modules  # nothing imported by asking

    import probe_pkg.target

    assert probe_pkg.target.VALUE == 2  # patched after its code ran, once
    assert sys.meta_path == finders  # the finder stepped aside


def test_patches_an_imported_module_at_once(package: str) -> None:
    import probe_pkg.target

    patch_on_import(package, _double)
    assert probe_pkg.target.VALUE == 2
