"""Test-suite setup: tests/ on sys.path so every folder imports the shared helpers (grin_testing, grin_sharding, slurm)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
