"""The app's Hydra configs (``pkg://mis_lightning.conf``).

The ``quantizer`` group has no files: importing this package (Hydra does, to read it)
generates it from the scheme registry into Hydra's ConfigStore; the ``plan`` group's
``default`` is the dataclass ``mis_lightning.planning.PlanConfig`` (structured config).
"""

from mis_lightning.app.factories import store_plan_group, store_quantizer_group

store_quantizer_group()
store_plan_group()  # the planner's options (mode=plan), from its dataclass
