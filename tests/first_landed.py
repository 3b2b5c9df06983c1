"""The U-Net as first landed (git a62c2f1), read from git history at run time: the reference that
tests/test_unet.py and benchmarks/unet_speed.py compare the current lib/models/unet.py with.

No copy lives in the tree; where the history is missing (an export, a shallow clone) loading raises
FirstLandedUnavailable with a one-line reason.
"""
import importlib.util
import os
import subprocess
import tempfile

REVISION = "a62c2f1:lib/models/unet.py"
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


class FirstLandedUnavailable(RuntimeError):
    """git history holding the first-landed U-Net cannot be read."""


def load_first_landed_unet_module():
    """The first-landed lib/models/unet.py as a module (its UNet, ResBlock, Upsample, ...)."""
    try:
        source = subprocess.run(["git", "-C", REPO, "show", REVISION], capture_output=True, text=True,
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        lines = (getattr(err, "stderr", None) or str(err)).strip().splitlines()
        raise FirstLandedUnavailable(
            f"cannot read the first-landed U-Net with `git show {REVISION}` ({lines[-1] if lines else 'no output'}); "
            "a clone of the repository with its history is needed") from None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "unet_first_landed.py")
        with open(path, "w") as f:
            f.write(source)
        spec = importlib.util.spec_from_file_location("unet_first_landed", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module
