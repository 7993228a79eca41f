"""Runtime hook for the standalone bundle, run before chat starts."""

import warnings

# The bundle leaves numpy out (torch does not need it); torch then warns on import that it could
# not initialise NumPy, which means nothing to a chat user.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
