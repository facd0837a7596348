# The front door. Two commands on a fresh Debian 12 machine:
#   make run    installs dependencies, builds, runs the main job
#   make test   installs dependencies, builds, runs the test suite (what CI runs)
BUILD ?= build
JOBS ?= $(shell nproc)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export OMPI_ALLOW_RUN_AS_ROOT = 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM = 1

DEB_PACKAGES := build-essential cmake libopenmpi-dev openmpi-bin libhdf5-openmpi-dev hdf5-tools \
  libboost-program-options-dev libboost-log-dev libgtest-dev nlohmann-json3-dev libopenblas-dev libopenblas-openmp-dev libpcre2-dev \
  pkg-config python3-h5py python3-numpy python3-matplotlib time \
  slurm-wlm slurmctld slurmd slurm-client munge

.PHONY: all deps build test run clean fuzz

all: build

# Idempotent and fast when everything is present: apt runs only for missing packages.
deps:
	@missing=$$(dpkg-query -W -f='$${Package} $${Status}\n' $(DEB_PACKAGES) 2>/dev/null | grep -v 'install ok installed' | cut -d' ' -f1; \
	  for p in $(DEB_PACKAGES); do dpkg-query -W $$p >/dev/null 2>&1 || echo $$p; done); \
	missing=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	if [ -n "$$(echo $$missing | tr -d ' ')" ]; then \
	  echo "make deps: installing $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    -o DPkg::Lock::Timeout=600 --no-install-recommends $$missing; \
	else echo "make deps: all Debian packages present"; fi

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release

build: $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

test: deps
	$(MAKE) build
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

run: deps
	$(MAKE) build
	scripts/run.sh $(BUILD)

clean:
	rm -rf $(BUILD)

FUZZ_SECONDS ?= 60
# libFuzzer targets of the file parsers (needs clang): build into build-fuzz/, run each for FUZZ_SECONDS, one at a time
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) tests/fuzz/run.sh
