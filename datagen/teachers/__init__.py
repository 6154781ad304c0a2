"""Teacher backends behind one batch-first protocol; see `teacher.py` for the entry point.

    from datagen.teachers import make_teacher
"""

from datagen.teachers.base import Completion, Request
from datagen.teachers.teacher import RunStats, Teacher, make_teacher

__all__ = ["Completion", "Request", "RunStats", "Teacher", "make_teacher"]
