"""(being written: see ISSUE21 brief)"""
from fastapi import APIRouter

router = APIRouter()
