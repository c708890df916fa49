import sys
import traceback

import torch

sys.path.insert(0, ".")
from engine.generate import Engine  # noqa: E402
from engine.loader import load_model  # noqa: E402

F = "tests/data/conformance/hymba-mirror-12L"
for label, pre in [("after set_device(0)", 0), ("after set_device(1)", 1)]:
    torch.cuda.set_device(pre)
    try:
        cfg, model, state = load_model(F, "cuda:1", "bfloat16")
        print(label, "load_model ok")
        tok = torch.zeros(1, dtype=torch.long, device="cuda:1")
        model.decode_step(tok, state)
        print(label, "eager decode_step ok")
        e = Engine.load(F, device="cuda:1", dtype="bfloat16")
        print(label, "Engine.load ok")
    except Exception:
        traceback.print_exc(limit=-6)
        print(label, "current_device", torch.cuda.current_device())
