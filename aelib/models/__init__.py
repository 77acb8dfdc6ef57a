"""The tutorial's seven variants; importing this package registers them, in
the tutorial's order."""

# isort: skip_file
from aelib.models import dense  # noqa: F401  dense, sparse, deep
from aelib.models import conv  # noqa: F401  conv, denoise
from aelib.models import seq2seq  # noqa: F401
from aelib.models import vae  # noqa: F401
