"""The app's Hydra configs (``pkg://mis_lightning.conf``).

The ``quantizer`` group has no files: importing this package (Hydra does, to read it)
generates it from the scheme registry into Hydra's ConfigStore.
"""

from mis_lightning.app.factories import store_quantizer_group

store_quantizer_group()
