"""Mixed-precision policies: bf16 compute with fp32 parameters, BatchNorm and loss."""
import haiku as hk
import jmp

from detcon import networks

_POLICIES = {
    "float32": "params=float32,compute=float32,output=float32",
    "bfloat16": "params=float32,compute=bfloat16,output=float32",
}


def set_policy(precision: str) -> None:
    """Sets Haiku's per-module policies for `precision` ('float32' or 'bfloat16')."""
    if precision not in _POLICIES:
        raise ValueError(f"config.model.precision must be one of {sorted(_POLICIES)}, got "
                         f"{precision!r}.")
    policy = jmp.get_policy(_POLICIES[precision])
    compute = "bfloat16" if precision == "bfloat16" else "float32"
    # BatchNorm computes its statistics in fp32 and hands the compute dtype back to the next conv.
    batch_norm = jmp.get_policy(f"params=float32,compute=float32,output={compute}")
    hk.mixed_precision.set_policy(networks.ResNetTorso, policy)
    hk.mixed_precision.set_policy(networks.MLP, policy)
    hk.mixed_precision.set_policy(hk.BatchNorm, batch_norm)
    hk.mixed_precision.set_policy(networks.LinearClassifier, jmp.get_policy(_POLICIES["float32"]))
