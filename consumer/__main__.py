import sys

from fraudstream.cli import main

sys.exit(main(["detect", *sys.argv[1:]]))
