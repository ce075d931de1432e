import sys

from kosmo.cli import main

sys.exit(main())
