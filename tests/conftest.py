"""Collection settings for the whole suite."""

import importlib.util

# The data tests decode video with PyAV (a dependency of the package, so always there under
# `make test`). A machine without it, such as the bare GPU image tools/gpu_check.sh runs the CUDA
# tests on, leaves them out rather than reporting their import errors as failures.
collect_ignore_glob = [] if importlib.util.find_spec("av") else ["test_data_*.py"]
