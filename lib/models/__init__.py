"""Networks for the drift a(y, s), registered by name so a checkpoint can rebuild them.

A checkpoint stores {'name': ..., 'kwargs': {...}} (plain types); `build_drift` turns it back
into the module. A new network is one entry here.
"""


def _registry():
    # Imported on use so that importing lib.models stays cheap and free of cycles.
    from lib.models.mlp import MLPDrift
    from lib.models.precond import PreconditionedUNet
    from lib.models.unet import UNet

    return {"mlp": MLPDrift, "unet": UNet, "precond_unet": PreconditionedUNet}


def build_drift(name, kwargs):
    """The drift network `name` built from its constructor keyword arguments."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown drift network {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name](**kwargs)
