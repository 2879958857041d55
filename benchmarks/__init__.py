"""Side-by-side measurements of fraudstream against the usual ways of writing the same pipeline.

Run `python -m benchmarks` (see benchmarks/__main__.py). Never used for timed assertions.
"""
