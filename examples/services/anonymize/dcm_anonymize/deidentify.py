"""The de-identification profile applied to one pydicom dataset.

A deliberately small, readable subset of the DICOM basic application level
confidentiality profile (PS3.15 table E.1-1): the attributes that identify a
patient, a physician or an institution in the files scanners and PACS actually
send. Patient name and ID become a salted hash pseudonym (the same patient gets
the same pseudonym in every session, so de-identified studies still link up);
every other person name is emptied wherever it occurs, including inside
sequences and SR content; private tags are removed.

UIDs are **remapped** by default: every UID that names an instance (study,
series, SOP instance, frame of reference, references to them...) is replaced by
``2.25.<128 bits of sha256(salt + uid)>``. The map is deterministic, so the
same original UID always gets the same new UID and references between
instances, series and frames of reference stay consistent across files and
sessions without storing a table. UIDs that name a definition rather than an
instance are kept: registered DICOM UIDs, and SOP class, transfer syntax and
coding scheme UIDs even when private. ``keep_uids=True`` retains them all.

Dates are kept by default (the profile's "retain longitudinal temporal
information" option) because downstream research needs time between studies;
``keep_dates=False`` empties every DA, DT and TM value. The birth date is
always emptied.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

UID_ROOT = "2.25"
PSEUDONYM_PREFIX = "ANON-"
METHOD_NAME = "dcm_anonymize 1.0.0"

# Attributes the profile removes (action X) that the sample and clinical files
# carry; removal rather than emptying because none of them is type 1 or 2.
REMOVED_KEYWORDS = frozenset(
    {
        "AdditionalPatientHistory",
        "AdmissionID",
        "AdmittingDiagnosesDescription",
        "BranchOfService",
        "CountryOfResidence",
        "CurrentPatientLocation",
        "DeviceSerialNumber",
        "EthnicGroup",
        "ImageComments",
        "InstitutionAddress",
        "InstitutionCodeSequence",
        "InstitutionName",
        "InstitutionalDepartmentName",
        "IssuerOfPatientID",
        "MedicalRecordLocator",
        "MilitaryRank",
        "Occupation",
        "OperatorIdentificationSequence",
        "OtherPatientIDs",
        "OtherPatientIDsSequence",
        "OtherPatientNames",
        "PatientAddress",
        "PatientAge",
        "PatientBirthName",
        "PatientBirthTime",
        "PatientComments",
        "PatientInsurancePlanCodeSequence",
        "PatientMotherBirthName",
        "PatientReligiousPreference",
        "PatientSize",
        "PatientState",
        "PatientTelephoneNumbers",
        "PatientWeight",
        "PerformedProcedureStepDescription",
        "PerformedProcedureStepID",
        "PerformingPhysicianIdentificationSequence",
        "PhysiciansOfRecordIdentificationSequence",
        "PhysiciansReadingStudyIdentificationSequence",
        "ProtocolName",
        "ReferringPhysicianAddress",
        "ReferringPhysicianIdentificationSequence",
        "ReferringPhysicianTelephoneNumbers",
        "RegionOfResidence",
        "RequestAttributesSequence",
        "RequestingService",
        "ResponsibleOrganization",
        "SeriesDescription",
        "StationName",
        "StudyDescription",
    }
)

# Type 2 attributes (action Z): they must stay present, so they are emptied.
EMPTIED_KEYWORDS = frozenset({"AccessionNumber", "PatientBirthDate", "PatientSex", "StudyID"})

DATE_TIME_VRS = frozenset({"DA", "DT", "TM"})

# UI attributes naming a definition (a class, a syntax, a coding scheme), which
# identifies no one and must stay as is for the object to keep its meaning.
DEFINITION_UID_SUFFIXES = ("ClassUID", "TransferSyntaxUID")
DEFINITION_UID_KEYWORDS = frozenset(
    {
        "CodingSchemeUID",
        "ContextGroupExtensionCreatorUID",
        "ContextUID",
        "MappingResourceUID",
        "TemplateExtensionCreatorUID",
        "TemplateExtensionOrganizationUID",
    }
)


@dataclass(frozen=True)
class Profile:
    """Options of one de-identification run.

    ``salt`` is a site secret mixed into every hash: without it anyone who can
    guess a PatientID or UID can recompute its pseudonym.
    """

    salt: str = ""
    keep_uids: bool = False
    keep_dates: bool = True

    def method_description(self) -> list[str]:
        """Values for DeidentificationMethod (LO, so each at most 64 characters)."""
        return [
            METHOD_NAME,
            "PS3.15 E.1-1 basic profile subset",
            "private tags removed",
            "UIDs retained" if self.keep_uids else f"UIDs remapped to {UID_ROOT} sha256",
            "dates retained" if self.keep_dates else "dates removed",
        ]


def _digest(salt: str, kind: str, value: str) -> str:
    return hashlib.sha256(f"{salt}\x00{kind}\x00{value}".encode()).hexdigest()


def pseudonym(patient_id: str, salt: str = "") -> str:
    """Stable pseudonym for a patient: same PatientID and salt, same pseudonym."""
    return PSEUDONYM_PREFIX + _digest(salt, "patient", patient_id)[:16].upper()


def remap_uid(uid: str, salt: str = "") -> str:
    """Deterministic replacement UID under the 2.25 (UUID-derived) root."""
    return f"{UID_ROOT}.{int(_digest(salt, 'uid', uid)[:32], 16)}"


def is_registered_uid(uid: str) -> bool:
    """True for UIDs defined by the standard (SOP classes, transfer syntaxes...)."""
    return UID(uid).name != uid


def names_a_definition(keyword: str) -> bool:
    """True for UI attributes whose value is a class, syntax or scheme, not an instance."""
    return keyword in DEFINITION_UID_KEYWORDS or keyword.endswith(DEFINITION_UID_SUFFIXES)


def _remapped_value(value: object, salt: str) -> object:
    if isinstance(value, MultiValue | list):
        return [_remapped_value(v, salt) for v in value]
    text = str(value)
    if not text or is_registered_uid(text):
        return value
    return remap_uid(text, salt)


def _clean_element(profile: Profile, ds: Dataset, elem: DataElement) -> None:
    """Dataset.walk callback: apply the profile to one element."""
    keyword = elem.keyword
    if keyword == "PatientName":
        # Walk order is by tag, so the name (0010,0010) is visited while the
        # ID (0010,0020) of the same item is still the original one.
        elem.value = pseudonym(str(ds.get("PatientID", "") or elem.value or ""), profile.salt)
    elif keyword == "PatientID":
        elem.value = pseudonym(str(elem.value or ""), profile.salt)
    elif keyword in REMOVED_KEYWORDS:
        del ds[elem.tag]
    elif keyword in EMPTIED_KEYWORDS or elem.VR == "PN":
        # Person names hide in many places (operators, observers, SR content
        # items); emptying every PN is safer than listing them all.
        elem.value = ""
    elif elem.VR in DATE_TIME_VRS and not profile.keep_dates:
        elem.value = ""
    elif elem.VR == "UI" and elem.value and not (profile.keep_uids or names_a_definition(keyword)):
        elem.value = _remapped_value(elem.value, profile.salt)


def deidentify(ds: Dataset, profile: Profile) -> Dataset:
    """De-identify ``ds`` in place and return it."""
    ds.remove_private_tags()
    # Command elements (group 0000) belong to network messages, never to a
    # stored file; zeros padding a file read as one, which no file may be
    # written with.
    for tag in [tag for tag in ds.keys() if tag.group == 0]:  # noqa: SIM118 - deleting while iterating
        del ds[tag]
    ds.walk(lambda d, e: _clean_element(profile, d, e))
    # Both are type 2: a file that lacked them still gets the pseudonym.
    if not ds.get("PatientID"):
        ds.PatientID = str(ds.get("PatientName") or pseudonym("", profile.salt))
    if not ds.get("PatientName"):
        ds.PatientName = ds.PatientID
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = profile.method_description()
    ds.LongitudinalTemporalInformationModified = "UNMODIFIED" if profile.keep_dates else "REMOVED"
    _sync_file_meta(ds)
    return ds


def _sync_file_meta(ds: Dataset) -> None:
    # The file meta header repeats the SOP Instance UID; it must follow the
    # remapped value or readers see two different identities for one file.
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
