"""Teachers: one output schema (`TeacherOutput`) for every kind, the scorers, and their Serve deployments."""

from distillation.teachers.schema import TeacherOutput

__all__ = ["TeacherOutput"]
