# vsmmu — two commands for a user: `make run` and `make test`.
# Everything else (venv, QEMU, guest images) is set up on demand, idempotently:
# the venv inside this checkout (.venv/, git-ignored), downloads and builds in
# one cache per user, shared by every clone (keyed by content).

PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
# $VSMMU_CACHE, else $XDG_CACHE_HOME/vsmmu, else ~/.cache/vsmmu.
CACHE    ?= $(or $(VSMMU_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/vsmmu)
export VSMMU_CACHE := $(CACHE)
STAMP    := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: setup venv qemu guest host-lane run test test-fast bench soak lint clean doctor

setup: venv qemu guest

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> creating Python venv in $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --disable-pip-version-check -q --upgrade pip >/dev/null
	@echo "==> installing vsmmu and its dependencies into $(VENV)"
	@$(PY) -m pip install --disable-pip-version-check --progress-bar on -e '.[dev]'
	@touch $(STAMP)

qemu: venv
	@$(PY) -m qmp_harness.provision --cache $(CACHE)

# The default guest kernel (trixie, 6.12), then the newer one the e2e matrix
# also boots (trixie-backports, whose driver prints decoded event names).
NEWER_GUEST_SUITE ?= trixie-backports

guest: venv
	@$(PY) -m guest_images --cache $(CACHE)
	@$(PY) -m guest_images --cache $(CACHE) --suite $(NEWER_GUEST_SUITE)

# The host lane (README, "The host lane"): QEMU's nesting SMMUv3 running an
# iommufd kernel built once from Debian's source (~12 min on 2 cores, cached).
# Only `make test` needs it; `make run` does not wait for a kernel build.
host-lane: setup
	@$(PY) -m qmp_harness.host_lane setup

run: setup
	@$(PY) -m vsmmu.cli demo --cache $(CACHE)

test: setup host-lane
	@$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	@$(PY) -m pytest -m "not e2e and not integration and not host_lane" $(PYTEST_ARGS)

bench: setup
	@$(PY) -m benchmarks --cache $(CACHE)

# Not part of `make test`: a guest DMAs through the vSMMU while the service is
# fuzzed and QEMU is killed and restarted (README, "Reliability").
SOAK_MINUTES ?= 10
soak: setup
	@$(PY) -m reliability soak --cache $(CACHE) --minutes $(SOAK_MINUTES)

lint: venv
	@$(PY) -m ruff check vsmmu qmp_harness guest_images tests benchmarks reliability
	@$(PY) -m mypy

doctor: setup
	@$(VENV)/bin/vsmmu doctor --cache $(CACHE)

# The per-user cache is left alone (other clones share it); prune it by hand:
# rm -rf ~/.cache/vsmmu (README, "Where things go").
clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
