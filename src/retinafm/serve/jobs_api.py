"""(being written: see ISSUE21 brief)"""
from fastapi import APIRouter

router = APIRouter()


class JobQueue:
    def __init__(self, config):
        self.config = config

    def start(self):
        pass

    def stop(self):
        pass
