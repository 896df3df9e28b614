"""Same as `visattn bench na`: see visattn/bench/na.py."""
import argparse
import sys

from visattn.bench import na

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=na.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    na.add_arguments(parser)
    sys.exit(na.main(parser.parse_args()))
