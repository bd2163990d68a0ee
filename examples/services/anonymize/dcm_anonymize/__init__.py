"""De-identification example service for the dcm-processor job scheduler.

A pre-phase job: every main job of the session may rely on a de-identified copy
of the candidate existing under ``<session_dir>/anonymize``. The profile lives
in :mod:`dcm_anonymize.deidentify` (pure functions on pydicom datasets), the
scheduler-facing functions in :mod:`dcm_anonymize.registry` (callback) and
:mod:`dcm_anonymize.worker` (worker).
"""
