"""DICOMweb: QIDO-RS searches, WADO-RS retrieval and STOW-RS storage, with credentials from the environment.

Below both of its callers: ``pipeline.data`` reads training datasets whose labels live on a
PACS through it, and ``pipeline.pacs`` segments studies and stores SEGs back through it. It
imports only ``pipeline.errors``.
"""

from pipeline.dicomweb.client import ENV_CA_BUNDLE, ENV_PASSWORD, ENV_TOKEN, ENV_USER, DicomWebClient, redact_url
from pipeline.dicomweb.series import SeriesSummary

__all__ = ["DicomWebClient", "ENV_CA_BUNDLE", "ENV_PASSWORD", "ENV_TOKEN", "ENV_USER", "SeriesSummary", "redact_url"]
