"""The committed gRPC stubs are what generate.py writes from the repo's protos today."""

import subprocess
import sys
import unittest

from .support import PACKAGE_ROOT


class GeneratedStubsTest(unittest.TestCase):
    def test_committed_stubs_are_fresh(self):
        result = subprocess.run([sys.executable, str(PACKAGE_ROOT / "generate.py"), "--check"],
                                capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)


if __name__ == "__main__":
    unittest.main()
