"""`python -m fraudstream.producer ...`: the same as `fraudstream produce ...`."""

import sys

from fraudstream.cli import main

sys.exit(main(["produce", *sys.argv[1:]]))
