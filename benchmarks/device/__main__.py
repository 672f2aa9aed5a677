"""`python3 -m benchmarks.device`: run the device check (benchmarks.device.check)."""

import sys

from .check import main

sys.exit(main())
