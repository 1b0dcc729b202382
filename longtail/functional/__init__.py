"""Pure tensor functions, one per formula of the seeds (``torch.nn.functional`` style).

Every function's docstring cites the paper (authors, year) and the equation or section it implements. Modules in
``longtail.losses``, ``longtail.calibration`` and ``longtail.stage2`` only hold state and call these.
"""
from longtail.functional.data import *  # noqa: F401,F403
from longtail.functional.losses import *  # noqa: F401,F403
from longtail.functional.calibration import *  # noqa: F401,F403
from longtail.functional.experts import *  # noqa: F401,F403
from longtail.functional.decoupling import *  # noqa: F401,F403
from longtail.functional.mixing import *  # noqa: F401,F403
from longtail.functional.label_shift import *  # noqa: F401,F403
