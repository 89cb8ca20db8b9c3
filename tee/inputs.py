"""INPUT strings -> what a bundle's enclave takes: one dict of named arrays per input (`infer`, `audit`)."""
from __future__ import annotations

import numpy as np

from base.errors import TinyshieldError
from edge.inputs import read_inputs


def bundle_inputs(header: dict, specs: list[str]) -> list[dict]:
    """One dict per INPUT with the input names of the bundle's enclave config ("input" section)."""
    spec = header["enclave_config"]["input"]
    if header["kind"] == "pt2":      # a user's exported program: each INPUT is a .npy of its one input
        if len(spec) != 1:
            raise TinyshieldError(f"this model takes {len(spec)} inputs ({', '.join(spec)}); only one-input .pt2 "
                                  "models are served from the command line")
        (name, shape), = spec.items()
        xs, _ = read_inputs(specs, "tensor", shape)
        return [{name: x} for x in xs]
    if "image" in spec:
        if spec["image"][-2:] != [28, 28]:
            raise TinyshieldError(f"this bundle takes {spec['image'][-2:]} images; only 28x28 inputs are supported here")
        xs, _ = read_inputs(specs, "image")
        return [{"image": x} for x in xs]
    xs, _ = read_inputs(specs, "ids", seq_len=spec["input_ids"][1])
    # the tokenizer's attention mask is exactly "not [PAD]" (id 0 is only ever padding)
    return [{"input_ids": x, "attention_mask": (x != 0).astype(np.int32)} for x in xs]
