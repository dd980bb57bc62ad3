# The two set-up commands: `make demo` and `make test` (and `make docs` for the site). Each creates .venv when
# it is missing (or pyproject.toml changed) and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test docs lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test,server,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/unet-pipeline run

# Two pytest-xdist workers; each test file runs whole in one of them (its module fixtures are built once): most
# tests wait on subprocesses and servers, so two share 2 cores well (9 min). tests/conftest.py makes idle OpenMP
# threads sleep (OMP_WAIT_POLICY=PASSIVE): spinning ones made the two workers 1.5x slower (12.5 min).
# The PACS tests run a real Orthanc, the report tests a headless Chromium, the PostgreSQL tests a real PostgreSQL
# under an mlflow server (each skipped without it). As root (CI) the Debian packages of whichever is missing are
# installed; elsewhere nothing is installed. /usr/sbin is often not in a user's PATH: test the files. Debian keeps
# initdb and pg_ctl in /usr/lib/postgresql/VERSION/bin, off PATH.
ORTHANC_PACKAGES := orthanc orthanc-dicomweb
CHROMIUM_PACKAGES := chromium chromium-driver
POSTGRES_PACKAGES := postgresql
# rt-utils (the label-writer tests) imports OpenCV, whose wheel links libGL and GLib.
OPENCV_PACKAGES := libgl1 libglib2.0-0t64
# In CI (CI set, as every CI service sets it, and .ci/run) a test that would skip for want of data, Orthanc,
# Chromium, PostgreSQL or a compiler fails the run instead, naming what it missed (tests/strict_skips.py): a CI
# image that lost one would otherwise go green without those tests. A developer's `make test` or plain pytest
# still skips them with the reason; UNET_TESTS_STRICT=1 or 0 in the environment decides either way.
TESTS_STRICT := $(if $(filter-out 0 false no,$(CI)),1,0)

test: $(STAMP)
	$(BIN)/ruff check .
	@missing=; \
	  { [ -x /usr/sbin/Orthanc ] && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; } || missing="$(ORTHANC_PACKAGES)"; \
	  { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || missing="$$missing $(CHROMIUM_PACKAGES)"; \
	  { command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } \
	    || missing="$$missing $(POSTGRES_PACKAGES)"; \
	  $(BIN)/python -c "import cv2" 2>/dev/null || missing="$$missing $(OPENCV_PACKAGES)"; \
	  [ -z "$$missing" ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
	  || { echo "installing" $$missing "for the PACS, report, PostgreSQL and label-writer tests"; apt-get update -qq \
	       && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; }
	UNET_TESTS_STRICT="$${UNET_TESTS_STRICT:-$(TESTS_STRICT)}" $(BIN)/python -m pytest -ra --durations=20 -n 2 --dist loadfile

# The docs site from docs/ into site/, offline; --strict fails on a broken link or anchor, a page missing from the
# nav, and (through scripts/docs_reference.py) a config key or CLI flag without documentation.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf unet-work .pytest_cache site
