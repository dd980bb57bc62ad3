# The two set-up commands: `make demo` and `make test`. Each creates .venv when
# it is missing (or pyproject.toml changed) and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/unet-pipeline run

# The PACS tests run a real Orthanc (skipped without it). As root (CI) the Debian packages are installed
# when missing; elsewhere nothing is installed. /usr/sbin is often not in a user's PATH: test the file.
ORTHANC_PACKAGES := orthanc orthanc-dicomweb

test: $(STAMP)
	$(BIN)/ruff check .
	@{ [ -x /usr/sbin/Orthanc ] && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; } \
	  || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
	  || { echo "installing $(ORTHANC_PACKAGES) for the PACS tests"; apt-get update -qq \
	       && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(ORTHANC_PACKAGES) >/dev/null; }
	$(BIN)/python -m pytest -ra

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf unet-work .pytest_cache
