from shop_mesh.services.common.server import run_service
from shop_mesh.services.user.app import build
from shop_mesh.services.user.config import UserSettings

run_service(UserSettings(), build)
