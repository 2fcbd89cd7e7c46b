# The two commands: `make run` (the demo) and `make test`. Both install what they need first.
export ORT_DYLIB_PATH ?= $(CURDIR)/.deps/onnxruntime/libonnxruntime.so

.PHONY: setup build run test lint bench clean

setup:
	./scripts/setup.sh

build: setup
	cargo build --release

run: build
	./scripts/run-demo.sh

test: setup
	cargo test --release --workspace --no-fail-fast

lint:
	cargo fmt --all --check
	cargo clippy --release --workspace --all-targets -- -D warnings

bench: setup
	python3 benches/run.py --soak

clean:
	cargo clean
	rm -rf .deps fixtures
