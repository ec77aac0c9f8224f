"""The demo: `python -m demo` generates the real-data sample set (demo/data.py) and trains the tiny model
through the three stages on CPU (demo/chain.py)."""
