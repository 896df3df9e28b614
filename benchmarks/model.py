"""Same as `visattn bench model`: see visattn/bench/model.py."""
import argparse
import sys

from visattn.bench import model

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=model.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model.add_arguments(parser)
    sys.exit(model.main(parser.parse_args()))
