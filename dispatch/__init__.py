"""This deployment's Cloud Run job entry, kept for job definitions written as ``python -m dispatch.job``.

The job container's code is ``haulage.dispatch.job`` (``deploy/cloudrun/job.yaml``
runs it as ``python -m haulage.dispatch.job``); where steps run is set by
HAULAGE_DISPATCH_MODE and each step's ``runtime=``.
"""
