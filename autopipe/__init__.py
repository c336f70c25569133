"""autopipe: automatic pipeline parallelism for JAX.

``autopipe.plan(fn, *example_args, mesh=mesh)`` traces ``fn``, chooses pipeline stages with a
cost model and a dynamic program, and compiles ONE ``jax.jit(jax.shard_map(...))`` program in
which stages pass activations with ``jax.lax.ppermute``. See README.md.
"""

from autopipe._api import Factorization as Factorization
from autopipe._api import factorizations as factorizations
from autopipe._api import parallelize as parallelize
from autopipe._api import plan as plan
from autopipe._api import search_factorizations as search_factorizations
from autopipe._calibrate import Calibration as Calibration
from autopipe._calibrate import calibrate as calibrate
from autopipe._distributed import initialize as initialize
from autopipe._executable import TrainState as TrainState
from autopipe._plan import Plan as Plan
from autopipe._plan import Predicted as Predicted
from autopipe._plan import Stage as Stage
from autopipe._train import train as train
from autopipe._viz import chrome_trace as chrome_trace
from autopipe._viz import compare_schedules as compare_schedules
from autopipe._viz import plot_schedule as plot_schedule
from autopipe._viz import timeline as timeline
from autopipe.cost_models.hardware import PRESETS as PRESETS
from autopipe.cost_models.hardware import Hardware as Hardware
from autopipe.cost_models.hardware import load_hardware as load_hardware

__all__ = [
    "Calibration",
    "Factorization",
    "Hardware",
    "PRESETS",
    "Plan",
    "Predicted",
    "Stage",
    "TrainState",
    "calibrate",
    "chrome_trace",
    "compare_schedules",
    "factorizations",
    "initialize",
    "load_hardware",
    "parallelize",
    "plan",
    "plot_schedule",
    "search_factorizations",
    "timeline",
    "train",
]
