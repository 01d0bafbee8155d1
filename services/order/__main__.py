from services.common.server import run_service
from services.order.app import build
from services.order.config import OrderSettings

run_service(OrderSettings(), build)
