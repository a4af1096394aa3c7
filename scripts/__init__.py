"""Scripts run from the repository root (python scripts/NAME.py); a package so that the GPU tests import
scripts.record_goldens from this checkout whatever the image has installed."""
