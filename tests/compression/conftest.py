import os
import sys

# tests run with --import-mode=importlib: make the shared test kit next to this file importable
sys.path.insert(0, os.path.dirname(__file__))
