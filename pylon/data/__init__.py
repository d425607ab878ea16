"""Data: read radiographs, index the Kaggle and RSNA sets into Records, split by patient."""
from .records import Box, Record
from .readers import DatasetLayoutError, ImageReadError, read_image
from .report import IndexReport
from .dicom_writer import write_dicom
from .kaggle import index_kaggle, index_kaggle_with_report
from .rsna import index_rsna, index_rsna_with_report
from .splits import (PatientLeakageError, assert_no_patient_leakage, merge_sources, select_sources,
                     split_records)
from .cache import Geometry, ImageCache, UnreadableImage, build_cache, pixel_mean_std, resize_image
from .transforms import REFERENCE_MEAN, REFERENCE_STD, eval_transform, reseed, train_transform
from .dataset import (CxrDataset, balanced_sampler, collate, make_loader, pos_weight_from_prevalence,
                      prevalence, seed_worker)
