"""Data: read radiographs, index the Kaggle and RSNA sets into Records, split by patient."""
from .records import Box, Record
from .readers import DatasetLayoutError, ImageReadError, read_image
from .report import IndexReport
from .dicom_writer import write_dicom
from .kaggle import index_kaggle, index_kaggle_with_report
from .rsna import index_rsna, index_rsna_with_report
from .splits import (PatientLeakageError, assert_no_patient_leakage, merge_sources, select_sources,
                     split_records)
