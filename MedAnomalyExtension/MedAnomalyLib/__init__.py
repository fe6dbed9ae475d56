"""The MedAnomaly module's Slicer-free logic, importable (and tested) without Slicer.

- `environment`: where ``medanomaly`` and the bundles come from, what Slicer's Python still
  needs, PythonSlicer, the GPUs (standard library only).
- `inference`: the methods, the command line, the background process with progress and
  cancel, the result files and the reasons a run failed (wraps ``medanomaly.bundles``).
- `results`: heatmap -> segmentation at a threshold, slider range, display window, segment
  name / colour / terminology (numpy).
- `sampledata`: the committed sample volume, its checksum, and how it is regenerated.

Nothing is imported here: `inference` needs ``medanomaly``, which may not be installed yet
when Slicer loads the module.
"""
