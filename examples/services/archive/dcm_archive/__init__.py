"""Archive example service for the dcm-processor job scheduler.

A post-phase job, the session's ``finally``: it runs once every pre and main
job has ended, whatever the outcome, and packs what they left in the session
folder into one zip with its checksum and the outcome of each job.
"""
