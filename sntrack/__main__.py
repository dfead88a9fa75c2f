import sys

from sntrack.cli import main

sys.exit(main())
