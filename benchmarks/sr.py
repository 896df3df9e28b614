"""Same as `visattn bench sr`: see visattn/bench/sr.py."""
import argparse
import sys

from visattn.bench import sr

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=sr.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sr.add_arguments(parser)
    sys.exit(sr.main(parser.parse_args()))
