import sys

from ddpmlab.cli import main

sys.exit(main())
