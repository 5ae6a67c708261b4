import sys

from haulage.devtools.local_cloudrun.cli import main

sys.exit(main())
