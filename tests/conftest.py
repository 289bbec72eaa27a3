import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # configs/ and launch/ live beside the package
  sys.path.insert(0, ROOT)
