#!/bin/sh
# Builds one splitserve image with buildah, for the Makefile's `image` and `image-cuda` targets:
#   sh image/build.sh TAG BUILDAH_BUD_ARGS...
# Prints how long the build took and the image's size. The image TAG named before is removed once TAG names the new
# one: each build's venv layer is a new ~3 GB layer, and the old one would stay behind, untagged. The cached layers
# under it (torch, the dependencies) stay: they make the next build take seconds.
set -eu
tag=$1
shift
old=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
start=$(date +%s)
buildah bud "$@" -t "$tag" .
new=$(podman image inspect --format '{{.Id}}' "$tag")
if [ -n "$old" ] && [ "$old" != "$new" ]; then
    podman rmi "$old" >/dev/null 2>&1 || echo "kept the previous $tag ($old): a container or another tag uses it"
fi
echo "$tag: built in $(($(date +%s) - start)) s, $(podman image inspect --format '{{.Size}}' "$tag") bytes"
