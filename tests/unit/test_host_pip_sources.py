"""image/host_pip_sources.py: the host's pip sources become read-only mounts and PIP_OPTIONS for the image build."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "image" / "host_pip_sources.py"


def _load() -> ModuleType:
    # image/ is a folder of build helpers, not a package: load the script by its path.
    spec = importlib.util.spec_from_file_location("host_pip_sources", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sources = _load()

MIRROR_CONFIG = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/opt/wheels'
"""


def test_a_local_mirror_is_mounted_read_only_and_named_to_pip() -> None:
    args = sources.buildah_args(sources.configured_sources(MIRROR_CONFIG))
    # A file:// index's files lie beside its `simple` folder: the folder above it is mounted.
    assert args[:-1] == [
        "--volume=/opt/pypi:/opt/pypi:ro",
        "--volume=/opt/pypi-more:/opt/pypi-more:ro",
        "--volume=/opt/wheels:/opt/wheels:ro",
        "--volume=/etc/xdg/pip/constraints.txt:/etc/xdg/pip/constraints.txt:ro",
        "--volume=/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro",
    ]
    assert args[-1] == (
        "--build-arg=PIP_OPTIONS=--extra-index-url file:///opt/pypi/simple"
        " --extra-index-url file:///opt/pypi-more/simple --find-links /opt/wheels"
        " --constraint /etc/xdg/pip/constraints.txt --cert /etc/ssl/certs/ca-certificates.crt"
    )


def test_a_remote_index_is_passed_on_without_a_mount() -> None:
    config = "global.index-url='https://mirror.example/simple'\nglobal.timeout='60'\n"
    args = sources.buildah_args(sources.configured_sources(config))
    assert args == ["--build-arg=PIP_OPTIONS=--index-url https://mirror.example/simple"]


def test_no_configured_source_means_pypi_and_no_arguments() -> None:
    assert sources.buildah_args(sources.configured_sources("global.timeout='60'\n")) == []
