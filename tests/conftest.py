import os
import sys

# tests import their dense references (tests/dense.py) as plain modules
sys.path.insert(0, os.path.dirname(__file__))
