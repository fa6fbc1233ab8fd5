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
if [ ! -x "$venv/bin/python" ]; then
    echo "python-sdk: creating a virtual environment in $venv" >&2
    "$python3_bin" -m venv "$venv"
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
