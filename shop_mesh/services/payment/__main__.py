from shop_mesh.services.common.server import run_service
from shop_mesh.services.payment.app import build
from shop_mesh.services.payment.config import PaymentSettings

run_service(PaymentSettings(), build)
