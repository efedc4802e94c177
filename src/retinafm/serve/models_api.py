"""(being written: see ISSUE21 brief)"""
from fastapi import APIRouter

router = APIRouter()


class ModelCache:
    def __init__(self, config):
        self.config = config
