"""One default per fact: the values a recipe and the command line share.

`fedxr data split` and `fedxr data prepare` must split the same folder the same way, and every command must
find the same image cache. Plain constants with no imports, so that `fedxr --help` (which cannot import the
recipe model in an edge-only install) reads them as cheaply as the recipe model does. (typing's ``Final`` is the
one import: it keeps a literal's own type, for a recipe field that takes one of a few strings.)
"""

from typing import Final

#: Decoded-image cache (relative to the working folder), shared by training, evaluation and export.
CACHE_DIR = ".cache/fedxr"

# How a data set becomes sites (recipe section `data`, `fedxr data split`).
SITES = 3
SPLIT_SCHEME: Final = "column"
SITE_COLUMN = "hospital"
DIRICHLET_ALPHA = 0.5
VAL_FRACTION = 0.15
TEST_FRACTION = 0.2
MIN_SITE_PATIENTS = 2
DATA_SEED = 0

# The built-in phantom (recipe section `data.phantom`, `fedxr data phantom`).
PHANTOM_PATIENTS = 300
PHANTOM_HOSPITALS = 3
PHANTOM_SIZE = 128
PHANTOM_SEED = 0
