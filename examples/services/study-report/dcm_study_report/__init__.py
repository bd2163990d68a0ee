"""Study report example service for the dcm-processor job scheduler.

Depends on the ``thumbnails`` job and shows how a worker consumes the stored
result of its dependency (``kwargs["results"]``). :mod:`dcm_study_report.html`
renders the page from plain data, :mod:`dcm_study_report.worker` gathers that
data from the headers document and writes one file per study.
"""
