#!/usr/bin/env bash
# Tests of the Python participant SDK, on a machine that has Python 3 and nothing else:
# makes a virtual environment (participant-sdk/python/.venv, or $TREATY_PY_VENV) if there
# is none, installs the package with its test extra into it (again only when
# pyproject.toml changed), checks that the committed gRPC stubs are fresh, then runs the
# unittest suite. Exits non-zero on any failure. With --venv-only it stops once the
# environment is ready and prints its python (the conformance kit's tests use it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${TREATY_PY_VENV:-$here/.venv}"
python3_bin="${PYTHON:-python3}"

# Runs started at once (tests in parallel, the demo) take turns making the environment.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$venv.lock"
    flock 9
fi
if ! "$python3_bin" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "python-sdk: needs Python 3.10 or later; $python3_bin is $("$python3_bin" -V 2>&1)" \
        "(name another with PYTHON=...)" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    echo "python-sdk: creating a virtual environment in $venv" >&2
    # Debian and Ubuntu ship ensurepip apart (python3-venv): without it, the environment
    # is made without pip, and pip is installed below.
    "$python3_bin" -m venv "$venv" || "$python3_bin" -m venv --without-pip "$venv"
fi
if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "python-sdk: no pip in $venv; installing it from PyPI's wheel" >&2
    "$venv/bin/python" - <<'PY'
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request

# PyPI's JSON API, or that of the index pip is told to use (PIP_INDEX_URL, a
# ".../simple" address as pip takes it).
index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
base = index[: -len("/simple")] if index.endswith("/simple") else index
release_url = f"{base}/pypi/pip/json"
with urllib.request.urlopen(release_url, timeout=60) as answer:
    release = json.load(answer)
wheel = next(u for u in release["urls"] if u["packagetype"] == "bdist_wheel")
# A mirror in front of PyPI may answer with addresses relative to the release's.
wheel_url = urllib.parse.urljoin(release_url, wheel["url"])
with urllib.request.urlopen(wheel_url, timeout=300) as answer:
    data = answer.read()
if hashlib.sha256(data).hexdigest() != wheel["digests"]["sha256"]:
    sys.exit(f"python-sdk: {wheel['filename']} does not match PyPI's sha256")
with tempfile.TemporaryDirectory() as scratch:
    path = os.path.join(scratch, wheel["filename"])
    with open(path, "wb") as file:
        file.write(data)
    # pip runs from its own wheel, as ensurepip runs it, to install itself.
    environment = dict(os.environ, PYTHONPATH=path)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", path],
        check=True,
        env=environment,
    )
PY
fi
stamp="$venv/.treaty-participant-installed"
wanted="$(sha256sum "$here/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]; then
    echo "python-sdk: installing treaty-participant[test] into $venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$here[test]"
    echo "$wanted" >"$stamp"
fi
if command -v flock >/dev/null 2>&1; then
    flock --unlock 9
fi
if [ "${1:-}" = "--venv-only" ]; then
    echo "$venv/bin/python"
    exit 0
fi

cd "$here"
"$venv/bin/python" generate.py --check
"$venv/bin/python" - <<'PY'
import sys
import time
import unittest

started = time.monotonic()
suite = unittest.defaultTestLoader.discover("tests", top_level_dir=".")
result = unittest.TextTestRunner(verbosity=1).run(suite)
failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
skipped = len(result.skipped)
passed = result.testsRun - failed - skipped
print(f"python-sdk: tests took {time.monotonic() - started:.1f} s")
print(f"python-sdk: {passed} passed, {failed} failed, {skipped} skipped")
sys.exit(0 if result.wasSuccessful() else 1)
PY
