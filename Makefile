# Two entry points: `make demo` and `make test`. Each sets up what it needs on a fresh machine:
# a virtual env with the package and its dev extras, and the Fashion-MNIST Debian package.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# These releases are served from local disk on the project's machines; newer torch is not required.
TORCH := torch==2.14.1 torchvision==0.29.1
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: demo test bench bench-posthoc bench-scale fuzz data clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

data:
	@if [ -z "$$HF_VAE_COMPRESS_FASHION_MNIST_DIR" ] && [ ! -e $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing dataset-fashion-mnist"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing. Install it with: sudo apt-get install -y dataset-fashion-mnist"; \
	    echo "(or set HF_VAE_COMPRESS_FASHION_MNIST_DIR to a folder with the IDX files)"; exit 1; \
	  fi; \
	fi

demo: $(STAMP) data
	$(PY) recipes/demo.py

test: $(STAMP) data
	$(PY) -m pytest -q

bench: $(STAMP) data
	$(PY) benchmarks/rate_accuracy.py
	$(PY) benchmarks/load_speed.py
	$(PY) benchmarks/hub_roundtrip.py
	$(PY) benchmarks/default_compress.py
	$(PY) benchmarks/datafree.py
	$(PY) benchmarks/portable_vae.py
	$(PY) benchmarks/vae_protocol.py --fit-steps 200
	$(PY) benchmarks/posthoc_quality.py --calibration-seeds 0 1 --timing
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/report.py

bench-posthoc: $(STAMP) data
	$(PY) benchmarks/posthoc_quality.py --calibration-seeds 0 1 --timing
	$(PY) benchmarks/report.py

# ImageNet-size models on this machine's cores (about an hour on 2): run it alone, timings are the result
bench-scale: $(STAMP) data
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/report.py

fuzz: $(STAMP) data
	$(PY) benchmarks/fuzz_container.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
