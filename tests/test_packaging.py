"""The project installs under one namespace: nothing may shadow HF's `kernels` or claim `engine`."""
import subprocess
import sys
from pathlib import Path

import porter


def test_engine_and_kernels_live_under_porter():
    import porter.engine
    import porter.kernels

    root = Path(porter.__file__).resolve().parent.parent
    assert Path(porter.engine.__file__).resolve().parent == root / "engine"
    assert Path(porter.kernels.__file__).resolve().parent == root / "kernels"


def test_no_top_level_engine_or_kernels_from_this_project(tmp_path):
    # a fresh interpreter outside the checkout sees only what is installed
    root = Path(porter.__file__).resolve().parent.parent
    probe = (
        "import importlib.util\n"
        "for name in ('engine', 'kernels', 'templates'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    print(name, spec.origin if spec and spec.origin else (list(spec.submodule_search_locations) if spec else None))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        name, origin = line.split(" ", 1)
        # something else (e.g. HuggingFace's `kernels`) may exist; it must not be ours
        assert str(root) not in origin, f"`import {name}` resolves into porter's tree: {origin}"


def test_templates_are_package_data():
    from importlib.resources import files

    assert files("porter.templates").is_dir()
