"""Lightning's checkpoint input/output made safe: saves that are whole or absent, loads that run no code.

(One of calmwild's Lightning-facing modules.) Lightning's own ``_atomic_save`` writes a temporary file under
``$TMPDIR`` and moves it over the target; when ``$TMPDIR`` is on another filesystem (a local /tmp beside checkpoints
on NFS or Lustre) the move is a copy, and a kill during it leaves a truncated ``last.ckpt``. :class:`AtomicCheckpointIO`
writes through :func:`calmwild.io.atomic_write` instead (a temporary file beside the target, fsync, rename), so
a kill at any instant leaves either the previous checkpoint or the new one, and a full disk leaves the previous one
with a one-line error. Loads are ``weights_only=True`` always.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from calmwild.io import atomic_write, remove_stale_temporaries


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic, same-directory saves and weights-only loads (see the module docstring).
    Remote paths (``s3://`` and the like) keep Lightning's own handling."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        remove_stale_temporaries(path.parent)
        existed = path.exists()
        try:
            atomic_write(path, lambda handle: torch.save(checkpoint, handle))
        except OSError as err:
            kept = f"the previous {path.name} is intact" if existed else "nothing was written"
            raise OSError(err.errno, f"could not save checkpoint {path} ({err.strerror or err}); {kept}") from None
        return None

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("calmwild loads checkpoints with weights_only=True only")
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=True, **kwargs)
