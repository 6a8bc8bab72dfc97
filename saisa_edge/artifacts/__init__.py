"""The artifact-format layer between the build stages and the runtime (imports no torch, onnx or exporter).

  names     the graphs' input and output names
  manifest  the manifest, its schema and the checks done once per open
  schema    typed dataclasses (the model config) from manifest JSON
  kinds     the folders a runtime opens: `Artifact`, `Engines`
  folders   `atomic_folder`: writing outputs, the --force guard, recovery of killed writes
"""

from saisa_edge.artifacts.folders import atomic_folder, recover
from saisa_edge.artifacts.kinds import (
    DTYPE_NAMES, PRECISIONS, Artifact, EngineManifest, Engines, artifact_details, open_artifact, open_engines,
    open_runnable, precision_of,
)
from saisa_edge.artifacts.manifest import (
    ARTIFACT_KIND, CHECKPOINT_KIND, ENGINE_KIND, MANIFEST_NAME, MANIFEST_VERSION, FileEntry, Manifest, Opened,
    kind_of, open_folder, sha256_file, write_manifest,
)
from saisa_edge.artifacts.schema import config_from_json

__all__ = [
    "ARTIFACT_KIND", "CHECKPOINT_KIND", "DTYPE_NAMES", "ENGINE_KIND", "MANIFEST_NAME", "MANIFEST_VERSION", "PRECISIONS",
    "Artifact", "EngineManifest", "Engines", "FileEntry", "Manifest", "Opened", "artifact_details", "atomic_folder",
    "config_from_json", "kind_of", "open_artifact", "open_engines", "open_folder", "open_runnable", "precision_of",
    "recover", "sha256_file", "write_manifest",
]
