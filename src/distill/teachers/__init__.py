"""The teacher side: a frozen `Teacher`, `Ensemble`s of several, the teacher store and `CachedTeacher`,
and calibration (ECE, temperature). May import the contracts, losses and data; never engine, run or cli.
"""

from distill.teachers.ensemble import Ensemble, EnsembleKD
from distill.teachers.frozen import Teacher
from distill.teachers.store import CachedTeacher, write_store

__all__ = ["CachedTeacher", "Ensemble", "EnsembleKD", "Teacher", "write_store"]
