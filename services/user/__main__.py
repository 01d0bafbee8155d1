from services.common.server import run_service
from services.user.app import build
from services.user.config import UserSettings

run_service(UserSettings(), build)
