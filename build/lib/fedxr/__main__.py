import sys

from fedxr.cli import main

sys.exit(main())
