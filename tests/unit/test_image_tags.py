"""Every reference to the splitserve image names the tag `make image` builds: the package version (issue 19).

The operator's default derives it from the package metadata; the hand-written manifests and the docs carry it as
text, so a version bump that forgets one of them fails here.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from ops.operator.spec import DEFAULTS

ROOT = Path(__file__).resolve().parents[2]
# A tag starts with a digit; Prometheus names such as splitserve:requests_total (the Grafana dashboard) do not.
IMAGE_REFERENCE = re.compile(r"\bsplitserve:(\d[\w.+-]*)")
VERSION = metadata.version("splitserve")


def _files_naming_the_image() -> list[Path]:
    return [*sorted((ROOT / "k8s").rglob("*.yaml")), ROOT / "k8s" / "README.md", ROOT / "README.md"]


def test_the_operators_default_image_is_the_package_version() -> None:
    assert DEFAULTS["image"] == f"splitserve:{VERSION}"


def test_manifests_and_docs_name_the_package_version() -> None:
    wrong = [
        f"{path.relative_to(ROOT)}: splitserve:{tag}"
        for path in _files_naming_the_image()
        for tag in IMAGE_REFERENCE.findall(path.read_text())
        if tag not in (VERSION, f"{VERSION}-cuda")
    ]
    assert not wrong, f"image tags other than the package version {VERSION}: {wrong}"
    assert any(IMAGE_REFERENCE.search(path.read_text()) for path in _files_naming_the_image())
