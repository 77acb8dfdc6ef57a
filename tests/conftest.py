"""Test-wide defaults: MNIST by path (never downloaded), quiet TensorFlow."""

import os

from helpers import MNIST

os.environ.setdefault("AELIB_MNIST", str(MNIST))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
