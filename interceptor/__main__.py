import sys

from interceptor.daemon import main

sys.exit(main())
