"""``distill eval``: lm-eval on in-memory models, offline task data, teacher-vs-student reports."""
