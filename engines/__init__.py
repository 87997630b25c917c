"""Models and inference: weight loading, the PyTorch Whisper, batching, speculative decoding."""

import os

# OpenMP threads that spin while waiting collapse when anything else wants the same cores (the
# server's event loop, a second process): a whisper-base decode measured 8x slower on 2 busy
# cores with the default policy, and about the same as an idle machine with PASSIVE. It only
# takes effect if set before torch loads, so it is set as early as the package is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
