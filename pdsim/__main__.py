"""``python -m pdsim``: the simulator without the pdproxy CLI."""

import argparse
import sys

from pdsim import cli

parser = argparse.ArgumentParser(prog="python -m pdsim", description=cli.__doc__)
cli.add_arguments(parser)
sys.exit(cli.run(parser.parse_args()))
