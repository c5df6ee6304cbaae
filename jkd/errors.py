"""User-facing errors.

A `UserError` means the input is wrong (config, dataset, checkpoint), not the code. The CLI turns
it into one clear paragraph and exit code 2, with no traceback.
"""


class UserError(Exception):
  """Bad input: the message names the problem and the fix."""
