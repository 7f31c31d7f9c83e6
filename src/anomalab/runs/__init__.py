"""Everything that turns a detector into results on disk: run folders (`RunFolder`, `RunWriter`), the
fit / continue procedures (`fit_run`, `continue_run`), the output rules every writer follows
(`outputs`), atomic writes (`atomic`) and the resumable experiment results (`ResultStore`)."""

from anomalab.runs.fit import continue_run, fit_run
from anomalab.runs.folder import RunFolder, RunWriter, is_run
from anomalab.runs.store import ResultStore

__all__ = ["ResultStore", "RunFolder", "RunWriter", "continue_run", "fit_run", "is_run"]
