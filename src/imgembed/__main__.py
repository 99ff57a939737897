import sys

from imgembed.cli import main

sys.exit(main())
