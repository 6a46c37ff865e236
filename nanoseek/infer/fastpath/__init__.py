"""Speed-ups of the reference forward (nanoseek/model/) for cached decoding on CPU, applied from outside it,
as torchtitan applies compilation to a plain model. Only the engine enters: it decodes through
`Decoder(model)` (decoder.py), which takes the decoding plan (plan.py; its ops in ops.py, its products in
gemv.py) where it applies and the model everywhere else. Each trick is tested equal to the reference
(tests/infer/fastpath/).
"""

from nanoseek.infer.fastpath.decoder import Decoder
from nanoseek.infer.fastpath.plan import plan_for

__all__ = ["Decoder", "plan_for"]
