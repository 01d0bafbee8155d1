from services.common.server import run_service
from services.payment.app import build
from services.payment.config import PaymentSettings

run_service(PaymentSettings(), build)
