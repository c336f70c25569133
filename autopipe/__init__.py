"""autopipe: automatic pipeline parallelism for JAX.

``autopipe.plan(fn, *example_args, mesh=mesh)`` traces ``fn``, chooses pipeline stages with a
cost model and a dynamic program, and compiles ONE ``jax.jit(jax.shard_map(...))`` program in
which stages pass activations with ``jax.lax.ppermute``. The same in stages, each inspectable:
``autopipe.trace(fn, *example_args).lower(mesh).plan().compile()``. See README.md.
"""

from autopipe._api import plan as plan
from autopipe._api import train as train
from autopipe._calibrate import Calibration as Calibration
from autopipe._calibrate import calibrate as calibrate
from autopipe._checkpoint import restore_checkpoint as restore_checkpoint
from autopipe._checkpoint import save_checkpoint as save_checkpoint
from autopipe._decorator import parallelize as parallelize
from autopipe._distributed import initialize as initialize
from autopipe._executable import TrainState as TrainState
from autopipe._factorize import Factorization as Factorization
from autopipe._factorize import factorizations as factorizations
from autopipe._factorize import search_factorizations as search_factorizations
from autopipe._generate import Generation as Generation
from autopipe._generate import GenerationPlan as GenerationPlan
from autopipe._generate import generate as generate
from autopipe._generate import plan_generation as plan_generation
from autopipe._plan import PlanRecord as PlanRecord
from autopipe._plan import Predicted as Predicted
from autopipe._plan import Stage as Stage
from autopipe._planned import Plan as Plan
from autopipe._planned import Planned as Planned
from autopipe._reference import microbatch_reference as microbatch_reference
from autopipe._staged import Lowered as Lowered
from autopipe._staged import Traced as Traced
from autopipe._staged import trace as trace
from autopipe._viz import chrome_trace as chrome_trace
from autopipe._viz import compare_schedules as compare_schedules
from autopipe._viz import plot_schedule as plot_schedule
from autopipe._viz import timeline as timeline
from autopipe.cost_models.hardware import PRESETS as PRESETS
from autopipe.cost_models.hardware import Hardware as Hardware
from autopipe.cost_models.hardware import load_hardware as load_hardware
from autopipe.passes.inputs import ConstantKeyWarning as ConstantKeyWarning
from autopipe.passes.partition import PlanInfeasible as PlanInfeasible

__all__ = [
    "Calibration",
    "ConstantKeyWarning",
    "Factorization",
    "Generation",
    "GenerationPlan",
    "Hardware",
    "Lowered",
    "PRESETS",
    "Plan",
    "PlanInfeasible",
    "PlanRecord",
    "Planned",
    "Predicted",
    "Stage",
    "Traced",
    "TrainState",
    "calibrate",
    "chrome_trace",
    "compare_schedules",
    "factorizations",
    "generate",
    "initialize",
    "load_hardware",
    "microbatch_reference",
    "parallelize",
    "plan",
    "plan_generation",
    "plot_schedule",
    "restore_checkpoint",
    "save_checkpoint",
    "search_factorizations",
    "timeline",
    "trace",
    "train",
]
