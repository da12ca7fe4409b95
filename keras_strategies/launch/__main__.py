"""`python -m keras_strategies.launch ...`: see `keras_strategies.launch`."""

import sys

from keras_strategies.launch.cli import main

sys.exit(main())
