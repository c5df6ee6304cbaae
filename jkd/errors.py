"""User-facing errors.

A `UserError` means the input is wrong (config, dataset, checkpoint), not the code. The CLI turns
it into one clear paragraph and exit code 2, with no traceback.
"""


class UserError(Exception):
  """Bad input: the message names the problem and the fix."""


class TrainingDiverged(UserError):
  """A run stopped because a step went non-finite (NaN or inf). Nothing of that step was saved;
  the last good checkpoint is kept and summary.json says `status: failed`. The CLI exits with
  `exit_code` (3) rather than 2: the input was valid, the run was not."""
  exit_code = 3
