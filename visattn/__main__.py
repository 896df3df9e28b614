"""``python -m visattn``: the ``visattn`` command line."""
import sys

from visattn.cli import main

sys.exit(main())
