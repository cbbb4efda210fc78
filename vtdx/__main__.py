import sys

from vtdx.cli.main import main

sys.exit(main())
