"""``python -m proxy.sim``: the simulator without the pdproxy CLI."""

import argparse
import sys

from proxy.sim import cli

parser = argparse.ArgumentParser(prog="python -m proxy.sim", description=cli.__doc__)
cli.add_arguments(parser)
sys.exit(cli.run(parser.parse_args()))
