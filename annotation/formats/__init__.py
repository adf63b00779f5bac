"""The dataset layouts `python app.py import --format NAME` reads, one module each.

    from annotation.formats import FORMATS
    layout = FORMATS["rafdb"].read(Path("/data/RAF-DB/basic"))   # Layout(entries, broken, ...)

A format module has `read(path, **options) -> Layout` (annotation/formats/common.py; it takes
the options it needs: `fold`, `label_set`, `split`, `media_dir`, `name`, `progress`, and
ignores the rest), and may say `VIDEO = True` (its samples are clips) or `FILE = True` (its
path may be a file rather than a folder). See shared/DATASETS.md for the real layouts.

Adding a format is one new module here plus one line in FORMATS below: the CLI's --format
choices, the web app's list and the importer all read this registry.
"""
from __future__ import annotations

from types import ModuleType

from annotation.formats import affectnet, csv_list, dfew, fer2013, ferplus, ferv39k, folder, mafw, rafdb

FORMATS: dict[str, ModuleType] = {
    "rafdb": rafdb,          # EmoLabel/list_patition_label.txt + Image/aligned or Image/original
    "affectnet": affectnet,  # Manually_Annotated_file_lists/*.csv + Manually_Annotated_Images/
    "ferplus": ferplus,      # fer2013new.csv (10 votes -> majority) + FER2013{Train,Valid,Test}/
    "dfew": dfew,            # EmoLabel_DataSplit/.../set_K.csv + clips
    "ferv39k": ferv39k,      # 4_setups/All_scenes/*_All.csv + 2_ClipsforFaceCrop/
    "mafw": mafw,            # Train & Test Set/single/.../set_K/{train,test}.txt + clips
    "folder": folder,        # ROOT/<label>/... or ROOT/<split>/<label>/...
    "csv": csv_list,         # path,label[,split]
    "fer2013": fer2013,      # the original fer2013.csv (emotion,pixels,Usage)
}
FILE_FORMATS = {name for name, module in FORMATS.items() if getattr(module, "FILE", False)}
VIDEO_FORMATS = {name for name, module in FORMATS.items() if getattr(module, "VIDEO", False)}
