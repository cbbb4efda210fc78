import sys

from vtdx.cli import main

sys.exit(main())
