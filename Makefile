# The two commands: `make run` (the demo) and `make test`. Both install what they need first.
export ORT_DYLIB_PATH ?= $(CURDIR)/.deps/onnxruntime/libonnxruntime.so

.PHONY: setup build run test lint bench clean install

setup:
	./scripts/setup.sh

build: setup
	cargo build --release

run: build
	./scripts/run-demo.sh

# The test against a real Home Assistant needs its install (Python 3.13, once); on a machine
# without Python 3.13 it is skipped, and says so.
test: setup
	@if ./scripts/homeassistant.sh; then ha=1; else ha=0; \
	  echo "[test] no Python 3.13 on this machine: the Home Assistant test will say it skipped"; fi; \
	VIGIL_HA_REQUIRED=$$ha cargo test --release --workspace --no-fail-fast

# After `make build`: the binary, models, pipelines, ONNX Runtime, a config and a systemd unit
# (see "Deploying"); PREFIX, SYSCONFDIR, STATEDIR and UNITDIR say where.
install:
	./scripts/install.sh --no-build --prefix $(or $(PREFIX),/usr/local) \
	  --sysconfdir $(or $(SYSCONFDIR),/etc/vigil) --statedir $(or $(STATEDIR),/var/lib/vigil) \
	  --unitdir $(or $(UNITDIR),/etc/systemd/system)

lint:
	cargo fmt --all --check
	cargo clippy --release --workspace --all-targets -- -D warnings

bench: setup
	python3 benches/run.py --soak
	python3 benches/density.py
	python3 benches/remote.py
	python3 benches/memory.py

clean:
	cargo clean
	rm -rf .deps fixtures
