"""An example jacrun plugin: a user's own Function, found by ``kind: python``.

``job.yaml`` next to this package names ``jacrun_example.softmax:SoftmaxRegression`` with
``path: .``, so jacrun puts this folder on sys.path (on every worker) before importing it.
"""

from jacrun_example.softmax import SoftmaxRegression, from_weights

__all__ = ["SoftmaxRegression", "from_weights"]
