"""The wheel maps filters/, finetune/ and templates/ into the package, never as top-level names."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents_and_import_names(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, timeout=600,
    )
    [wheel] = tmp_path.glob("datagen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "datagen/filters/__init__.py" in names
    assert "datagen/finetune/__init__.py" in names
    assert "datagen/templates/__init__.py" in names
    assert not any(name.startswith(("filters/", "finetune/", "templates/", "tests/")) for name in names)

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, timeout=600)
    probe = (
        "import importlib.util, datagen.filters, datagen.finetune, datagen.templates\n"
        "print(datagen.filters.__file__)\n"
        "print(importlib.util.find_spec('filters'), importlib.util.find_spec('finetune'))"
    )
    result = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r})\n" + probe],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [str(target / "datagen" / "filters" / "__init__.py"), "None None"]
