import sys

from fedxr.edge.cli import main

sys.exit(main())
