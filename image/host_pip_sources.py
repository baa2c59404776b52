"""Prints the `buildah bud` arguments that let pip inside the image build use the host's package sources.

`make image` runs this so that the build finds packages where the host's own pip does: on a plain machine pip's
configuration names no sources, nothing is printed, and the build uses PyPI; on a machine with a local mirror
(find-links folders, `file://` indexes, a constraints file, a CA bundle) each local path is mounted read-only into
the build at the same place, and the options reach pip through the build argument PIP_OPTIONS (see the
Containerfile). The Containerfile itself stays free of any one machine's layout; the mounts are not part of the
image's layers.

A `file://` index is a PEP 503 tree `ROOT/simple/NAME/index.html` whose links point into ROOT (e.g.
`../../files/x.whl`), so ROOT, the folder above `simple`, is what gets mounted.

Usage: python3 image/host_pip_sources.py [PIP]   (PIP: the pip command to ask, default `python3 -m pip`)
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

# pip settings that say where packages come from and how to trust them, as pip options; the rest of pip's
# configuration (timeouts, verbosity) is the host's business. `cert` belongs here: the host may reach its index
# through a proxy whose certificate only the host's own CA bundle vouches for.
SOURCE_OPTIONS = ("index-url", "extra-index-url", "find-links", "constraint", "cert")


def configured_sources(pip_config_list: str) -> dict[str, list[str]]:
    """The source settings in `pip config list` output (`scope.key='value'` lines), values split and deduplicated."""
    sources: dict[str, list[str]] = {option: [] for option in SOURCE_OPTIONS}
    for line in pip_config_list.splitlines():
        name, _, quoted = line.partition("=")
        option = name.rpartition(".")[2]
        if option not in sources or not quoted:
            continue
        for value in shlex.split(quoted)[0].split():
            if value not in sources[option]:
                sources[option].append(value)
    return sources


def local_path(value: str) -> Path | None:
    """The host path a source value names (a path, or a `file://` URL), else None (an https index)."""
    if value.startswith("file://"):
        return Path(unquote(urlparse(value).path))
    if "://" in value:
        return None
    return Path(value)


def mount_for(path: Path) -> Path:
    # A file:// index's links lead out of its `simple` folder into the folder above it.
    return path.parent if path.name == "simple" else path


def buildah_args(sources: dict[str, list[str]]) -> list[str]:
    mounts: list[Path] = []
    pip_options: list[str] = []
    for option, values in sources.items():
        for value in values:
            pip_options += [f"--{option}", value]
            path = local_path(value)
            if path is not None and mount_for(path) not in mounts:
                mounts.append(mount_for(path))
    args = [f"--volume={path}:{path}:ro" for path in mounts]
    if pip_options:
        # pip splits its own list settings at whitespace, so no value holds any: a plain join is exact.
        args.append(f"--build-arg=PIP_OPTIONS={' '.join(pip_options)}")
    return args


def main(argv: list[str]) -> int:
    pip = argv[1:] or [sys.executable, "-m", "pip"]
    try:
        listing = subprocess.run([*pip, "config", "list"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        print(
            f"host_pip_sources: cannot read pip's configuration ({exc}); the build uses PyPI", file=sys.stderr
        )
        return 0  # an empty answer: `make image` goes on without a mirror
    print(shlex.join(buildah_args(configured_sources(listing))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
