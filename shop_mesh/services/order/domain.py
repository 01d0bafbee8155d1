"""Only for repository.py's import (helper P rewrites that file): the order model lives in model.py,
ports in ports.py and the use cases in queries/saga/cancel/settlement/reconciler.py."""

from shop_mesh.services.order.model import LineItem, Order, OrderEvent, OrderState

__all__ = ["LineItem", "Order", "OrderEvent", "OrderState"]
