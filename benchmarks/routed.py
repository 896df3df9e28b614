"""Same as `visattn bench routed`: see visattn/bench/routed.py."""
import argparse
import sys

from visattn.bench import routed

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=routed.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    routed.add_arguments(parser)
    sys.exit(routed.main(parser.parse_args()))
