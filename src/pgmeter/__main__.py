import sys

from pgmeter.cli import main

sys.exit(main())
