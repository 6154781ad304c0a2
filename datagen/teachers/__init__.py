"""Teacher backends behind one batch-first protocol; see `teacher.py` for the entry point.

    from datagen.teachers import make_teacher
"""

from datagen.teachers.base import Completion, Request
from datagen.teachers.teacher import BACKENDS, PriceTable, RunStats, Teacher, TeacherConfig, make_teacher

__all__ = ["BACKENDS", "Completion", "PriceTable", "Request", "RunStats", "Teacher", "TeacherConfig", "make_teacher"]
