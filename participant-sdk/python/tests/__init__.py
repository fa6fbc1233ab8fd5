"""Tests of the Python participant SDK (run them with ../run_tests.sh)."""

import os

# grpc core logs failed TLS handshakes (which some tests provoke) at INFO; keep output for
# what fails. Set before any test module imports grpc.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
