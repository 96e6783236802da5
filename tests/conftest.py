import os
import sys

# Make `tests/problems.py` importable as `problems` from every test module.
sys.path.insert(0, os.path.dirname(__file__))
