"""The Table-1 baselines that set up a user's weights by a procedure of their own (`Method.procedure` names one),
each in one file: its model code, its population-level stage and its per-user steps."""

from mta.baselines import perpcs, proper
from mta.stages.procedure import Procedure

BASELINES: dict[str, Procedure] = {"perpcs": perpcs.PROCEDURE, "proper": proper.PROCEDURE}
