"""The paper's experiments as commands, built on the library (curve.py: Figure 2, over
curve_runs.py)."""
