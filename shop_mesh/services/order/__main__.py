from shop_mesh.services.common.server import run_service
from shop_mesh.services.order.app import build
from shop_mesh.services.order.config import OrderSettings

run_service(OrderSettings(), build)
