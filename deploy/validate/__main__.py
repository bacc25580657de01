"""`python -m deploy.validate`: run every check, print the report, exit 1 if any failed."""

import sys

from deploy.validate.run import main

sys.exit(main())
