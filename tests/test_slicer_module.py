"""The 3D Slicer module MedAnomalyExtension, without Slicer.

- static checks: the module file parses, defines the Module / Widget / Logic / Test classes and
  a parameter node, imports nothing heavy when Slicer loads it (also checked by importing it
  against stub Slicer modules in a clean interpreter), uses only widgets its .ui defines, and
  the CMakeLists list every script and resource (also checked by configuring the extension
  with a stub Slicer when CMake is available);
- the Slicer-free logic in MedAnomalyLib: requirements, command line, progress, cancel,
  failure messages, threshold -> labelmap, result files and their geometry, the sample data;
- end to end: exactly the command the module launches (the repository's Python in place of
  PythonSlicer) on the module's synthetic lesion volume saved as .nrrd.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXTENSION = REPO / "MedAnomalyExtension"
MODULE_FILE = EXTENSION / "MedAnomaly.py"
UI_FILE = EXTENSION / "Resources" / "UI" / "MedAnomaly.ui"
if str(EXTENSION) not in sys.path:
    sys.path.insert(0, str(EXTENSION))

from MedAnomalyLib import environment, inputs, results, sampledata  # noqa: E402

HEAVY_MODULES = {"torch", "monai", "numpy", "scipy", "SimpleITK", "itk", "nibabel", "medanomaly", "ignite", "skimage",
                 "sklearn", "matplotlib", "nilearn", "lpips", "slicerio", "nrrd"}


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"), filename=str(MODULE_FILE))


# =============================================================================================
# the module file


def _bound_names(tree: ast.AST) -> set[str]:
    names = set(dir(builtins)) | {"__file__", "__name__"}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        elif isinstance(node, ast.Global):
            names |= set(node.names)
    return names


@pytest.mark.parametrize("path", [MODULE_FILE, *sorted((EXTENSION / "MedAnomalyLib").glob("*.py"))],
                         ids=lambda p: p.name)
def test_no_undefined_names(path):
    """A scope-blind check for typos: every name read is bound somewhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bound = _bound_names(tree)
    unknown = sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound)
    assert not unknown, f"{path.name} reads undefined names: {unknown}"


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def test_the_panels_setup_runs_on_the_widgets_the_ui_file_defines(stub_import):
    """MedAnomalyWidget.setup() runs against the stub Slicer with `self.ui` holding only the .ui's
    named widgets (as slicer.util.childWidgetVariables does): it finishes, and every name it reads
    is a widget of the .ui."""
    assert stub_import["setup"] == "returned"
    read = set(stub_import["ui_read"])
    assert {"applyButton", "methodComboBox", "deviceComboBox", "thresholdSlider"} <= read
    assert not read - set(ui_widgets())


SLICER_API = EXTENSION / "Testing" / "Python" / "slicer_api.json"
# Calls the Slicer source cannot vouch for: VTK's and Qt's own classes (not in Slicer's repository)
# and another extension's logic; each is a long-standing API of its library.
NOT_IN_SLICER_SOURCE = {
    "IsA": "vtkObjectBase", "UnRegister": "vtkObjectBase",
    "QSettings": "Qt (qt.QSettings)", "QTimer": "Qt (qt.QTimer)",
    "PyTorchUtilsLogic": "the PyTorch extension's PyTorchUtils module",
}


def _slicer_calls() -> tuple[set[str], set[str]]:
    """(method names called on objects, slicer.util functions called) in MedAnomaly.py: calls whose
    name starts upper-case (VTK / MRML / Qt style), minus the project's own classes."""
    own = {n.name for path in [MODULE_FILE, *EXTENSION.glob("MedAnomalyLib/*.py")]
           for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(n, ast.ClassDef)}
    methods, util = set(), set()
    for node in ast.walk(module_tree()):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name, owner = node.func.attr, node.func.value
            if name[:1].isupper() and name not in own:
                methods.add(name)
            if isinstance(owner, ast.Attribute) and owner.attr == "util":
                util.add(name)
    return methods, util


def test_every_slicer_call_is_in_the_supported_slicer_api():
    """Each VTK-style method and slicer.util function MedAnomaly.py calls exists in the Slicer source
    at every supported release tag (slicer_api.json, made by make_slicer_api.py from Slicer's git)."""
    api = json.loads(SLICER_API.read_text(encoding="utf-8"))
    assert set(api["tags"]) >= {"v5.10.0", "v5.12.0"} and all(len(sha) == 40 for sha in api["tags"].values())
    methods, util = _slicer_calls()
    assert {"SetTerminology", "ImportLabelmapToSegmentationNode", "AddNewNodeByClass"} <= methods
    unknown = methods - set(api["methods"]) - set(NOT_IN_SLICER_SOURCE)
    assert not unknown, f"not in Slicer {', '.join(api['tags'])}: {sorted(unknown)}"
    assert not util - set(api["slicer.util"]), f"not in slicer.util: {sorted(util - set(api['slicer.util']))}"
    assert not set(NOT_IN_SLICER_SOURCE) & set(api["methods"])  # nothing excused that Slicer has


def test_the_api_list_would_catch_a_call_slicer_does_not_have():
    api = set(json.loads(SLICER_API.read_text(encoding="utf-8"))["methods"])
    assert "SetTerminology" in api and "SetTerminologyAndMore" not in api  # 5.10+ has it, a typo is caught
    assert "GetTerminologyEntryTagName" in api and "AddNewNodeByClass" in api


def test_ui_file_is_a_qmrmlwidget_with_every_widget_the_code_uses():
    """Static, for the `self.ui.<name>` reads that only run in Slicer (during and after a detection,
    which the stub cannot drive): every one names a widget of the .ui."""
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget")
    assert (root.findtext("class"), top.get("class"), top.get("name")) == ("MedAnomaly", "qMRMLWidget", "MedAnomaly")
    widgets = ui_widgets()
    used = {n.attr for n in ast.walk(module_tree()) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Attribute) and n.value.attr == "ui"
            and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"}
    assert used and not used - set(widgets), f"used in MedAnomaly.py but not in the .ui: {used - set(widgets)}"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    custom = {w.get("class") for w in widgets.values() if not w.get("class").startswith("Q")}
    assert custom <= declared, f"custom widgets without a <customwidget> entry: {custom - declared}"
    # every MRML widget gets the scene from the top-level qMRMLWidget
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml = {name for name, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert mrml <= receivers


def test_ui_parameter_names_match_the_parameter_node(stub_import):
    """Every .ui widget with a SlicerParameterName names a field of the imported parameter node
    class, and node selectors / check boxes have that field's node type / bool."""
    fields = stub_import["parameters"]
    connected = {}
    for widget in ui_widgets().values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                connected[prop.findtext("string")] = widget
    assert connected, "no widget is connected to the parameter node"
    for parameter, widget in connected.items():
        assert parameter in fields, f"{widget.get('name')} is connected to unknown parameter {parameter}"
        if widget.get("class") == "qMRMLNodeComboBox":
            node_types = [s.text for p in widget.findall("property") if p.get("name") == "nodeTypes"
                          for s in p.iter("string")]
            assert node_types == [fields[parameter]], (parameter, node_types)
        elif widget.get("class") == "QCheckBox":
            assert fields[parameter] == "bool"
    # the input selector shows scalar volumes only (no labelmaps, no vector / 4D volumes)
    input_selector = ui_widgets()["inputSelector"]
    properties = {p.get("name"): p.findtext("bool") for p in input_selector.findall("property")}
    assert properties["showChildNodeTypes"] == "false"


STUB_SLICER = textwrap.dedent('''
    import json, sys, types, unittest

    class Anything:
        """Absorbs attribute access and calls, like a Qt / VTK object nobody looks at."""
        def __init__(self, *args, **kwargs): pass
        def __getattr__(self, name): return Anything()
        def __call__(self, *args, **kwargs): return Anything()
        def __or__(self, other): return self
        def __sub__(self, other): return 0  # e.g. a combo box's count - 1

    def module(name, **attributes):
        m = types.ModuleType(name)
        m.__dict__.update(attributes)
        sys.modules[name] = m
        return m

    class Settings:
        store = {}
        def value(self, key, default=None): return self.store.get(key, default)
        def setValue(self, key, value): self.store[key] = value

    def base(name):
        def __init__(self, parent=None, *args, **kwargs):
            self.parent = parent  # as Slicer's base classes do
        return type(name, (), {"__init__": __init__})

    class App(Anything):
        connected = []
        temporaryPath = "/tmp"
        slicerUserSettingsFilePath = "/nonexistent-medanomaly-settings/NA-MIC/Slicer.ini"
        majorVersion, minorVersion = 5, 10
        def connect(self, signal, slot): self.connected.append((signal, slot))

    # a stand-in for a non-English Slicer: Slicer's own translation of its core "Segmentation" category
    TRANSLATIONS = {("qSlicerAbstractCoreModule", "Segmentation"): "Segmentierung"}
    def translate(context, text): return TRANSLATIONS.get((context, text), text)
    app = App()
    slicer = module("slicer", app=app, modules=types.SimpleNamespace(),
                    vtkMRMLScalarVolumeNode=type("vtkMRMLScalarVolumeNode", (), {}),
                    vtkMRMLLabelMapVolumeNode=type("vtkMRMLLabelMapVolumeNode", (), {}),
                    vtkMRMLSegmentationNode=type("vtkMRMLSegmentationNode", (), {}))
    slicer.i18n = module("slicer.i18n", tr=lambda text: text, translate=translate)
    slicer.ScriptedLoadableModule = module(
        "slicer.ScriptedLoadableModule", ScriptedLoadableModule=base("ScriptedLoadableModule"),
        ScriptedLoadableModuleWidget=base("ScriptedLoadableModuleWidget"),
        ScriptedLoadableModuleLogic=base("ScriptedLoadableModuleLogic"), ScriptedLoadableModuleTest=unittest.TestCase)
    slicer.util = module("slicer.util", VTKObservationMixin=base("VTKObservationMixin"))
    wrapped = []  # the classes given to @parameterNodeWrapper
    slicer.parameterNodeWrapper = module("slicer.parameterNodeWrapper",
                                         parameterNodeWrapper=lambda cls: wrapped.append(cls) or cls)
    module("qt", QSettings=Settings, QTimer=Anything, Qt=Anything())
    module("ctk", ctkPathLineEdit=Anything())
    module("vtk", vtkCommand=Anything(), vtkMatrix4x4=Anything, vtkStringArray=Anything, vtkImageData=Anything)

    registered = []
    class SampleDataLogic:
        @staticmethod
        def registerCustomSampleDataSource(**kwargs): registered.append(kwargs)
        @staticmethod
        def registerCustomSampleDataCategory(category, title): pass
    module("SampleData", SampleDataLogic=SampleDataLogic)

    installed_torch = []
    class PyTorchUtilsLogic:  # the PyTorch extension: installs torch itself (through light-the-torch and pip)
        def installTorch(self, **kwargs):
            import os
            installed_torch.append(dict(kwargs, PIP_CONSTRAINT=os.environ.get("PIP_CONSTRAINT")))
            return types.SimpleNamespace(__version__="2.8.0")
    module("PyTorchUtils", PyTorchUtilsLogic=PyTorchUtilsLogic)

    class ImportGuard:
        """Refuses (and records) every import of the named top-level packages while `active`."""
        def __init__(self, names): self.names, self.active, self.attempts = set(names), True, []
        def find_spec(self, name, path=None, target=None):
            if self.active and name.split(".")[0] in self.names:
                self.attempts.append(name)
                raise ImportError(f"{name} must not be imported here")
            return None
    heavy_guard = ImportGuard(json.loads(sys.argv[3]))  # while Slicer loads the module and registers sample data
    torch_guard = ImportGuard(["torch", "torchvision", "monai"])  # in Slicer's process: never
    sys.meta_path[:0] = [heavy_guard, torch_guard]

    sys.path.insert(0, sys.argv[1])
    App.majorVersion, App.minorVersion = (int(v) for v in sys.argv[2].split("."))
    before = set(sys.modules)
    import MedAnomaly
    parent = types.SimpleNamespace()
    MedAnomaly.MedAnomaly(parent)
    loaded_by_module = sorted(set(sys.modules) - before)
    (signal, slot), = App.connected
    registered_before_startup = len(registered)
    slot()  # what Slicer calls when start-up has completed
    loaded_by_registration = sorted(set(sys.modules) - before)
    heavy_guard.active = False

    def qualified(cls): return [c.__name__ for c in cls.__mro__]
    classes = {name: qualified(value) for name, value in vars(MedAnomaly).items()
               if isinstance(value, type) and value.__module__ == "MedAnomaly"}
    parameters = {name: getattr(kind, "__name__", repr(kind))
                  for name, kind in MedAnomaly.MedAnomalyParameterNode.__annotations__.items()}

    logic = MedAnomaly.MedAnomalyLogic()
    methods = [m.name for m in logic.methods()]
    plan = logic.dependencyPlan()
    loaded_by_logic = sorted(set(sys.modules) - before)

    def outcome(call):
        try:
            call()
            return "returned"
        except Exception as error:
            return f"{type(error).__name__}: {error}"

    start = outcome(lambda: logic.startDetection(None, "dae"))

    # an installation: what reaches pip (slicer.util.pip_install), with the constraints file's text
    from pathlib import Path
    from MedAnomalyLib import environment
    pip_calls = []
    slicer.util.pip_install = lambda args: pip_calls.append([list(args), Path(args[1]).read_text()])
    plans = [environment.InstallPlan(packages=["nibabel>=5.4", "numpy>=1", "SimpleITK"],
                                     medanomaly=["--no-deps", "/opt/ext/Resources/medanomaly"], reasons=["r"]),
             environment.InstallPlan()]
    logic.dependencyPlan = lambda: plans.pop(0)
    installed = outcome(lambda: logic.setupPythonRequirements(askConfirmation=False))

    # PyTorch through the PyTorch extension, under the same constraints (as $PIP_CONSTRAINT)
    plans = [environment.InstallPlan(torch=["torch>=2.8"], reasons=["no torch"]), environment.InstallPlan()]
    torch_installed = outcome(lambda: logic.setupPythonRequirements(askConfirmation=False))

    # the panel's setup(): `self.ui` is what slicer.util.childWidgetVariables gives, the .ui's named
    # widgets only (any other name is an AttributeError, as in Slicer); every name it reads is recorded
    class ChildWidgets:
        def __init__(self, names): self._names, self._read = set(names), []
        def __getattr__(self, name):
            self._read.append(name)
            if name not in self._names:
                raise AttributeError(f"the .ui has no widget {name}")
            return Anything()
    ui = ChildWidgets(json.loads(sys.argv[4]))
    slicer.ScriptedLoadableModule.ScriptedLoadableModuleWidget.setup = lambda self: None
    slicer.util.loadUI = lambda path: Anything()
    slicer.util.childWidgetVariables = lambda widget: ui
    slicer.mrmlScene = Anything()
    widget = MedAnomaly.MedAnomalyWidget()
    widget.layout, widget.resourcePath = Anything(), lambda name: name
    widget.addObserver = widget.removeObserver = lambda *args: None
    widget.initializeParameterNode = lambda: None  # the wrapped parameter node needs Slicer's wrapper
    setup = outcome(widget.setup)
    ui_read = sorted(set(ui._read))

    logic.dependencyPlan = lambda: None  # the packages cannot be checked
    unknown_plan = outcome(lambda: logic.setupPythonRequirements(askConfirmation=False))
    print(json.dumps({"title": parent.title, "categories": parent.categories, "signal": signal,
                      "loaded_by_module": loaded_by_module, "loaded_by_registration": loaded_by_registration,
                      "registered": registered, "methods": methods, "source": logic.sourceFolder(),
                      "plan_empty": plan.empty, "loaded_by_logic": loaded_by_logic, "help": parent.helpText,
                      "version_problem": MedAnomaly.versionProblem(), "start": start, "unknown_plan": unknown_plan,
                      "installed": installed, "pip_calls": pip_calls, "restart": logic.restartNeeded,
                      "slot": slot.__name__,
                      "slot_is_registerSampleData": slot is MedAnomaly.registerSampleData,
                      "registered_before_startup": registered_before_startup,
                      "heavy_import_attempts": heavy_guard.attempts, "torch_import_attempts": torch_guard.attempts,
                      "torch_installed": torch_installed, "installed_torch": installed_torch,
                      "classes": classes, "parameters": parameters, "setup": setup, "ui_read": ui_read,
                      "parameter_node_wrapped": [c.__name__ for c in wrapped],
                      "test_methods": [m for m in dir(MedAnomaly.MedAnomalyTest) if not m.startswith("__")]}))
''')


def import_with_stub_slicer(folder: Path, slicer_version: str) -> dict:
    """Imports the module file in a fresh interpreter against stub Slicer modules of `slicer_version`."""
    script = folder / "stub_slicer.py"
    script.write_text(STUB_SLICER)
    env = {k: v for k, v in os.environ.items() if k != "MEDANOMALY_BUNDLE_PATH"}
    run = subprocess.run([sys.executable, str(script), str(EXTENSION), slicer_version,
                          json.dumps(sorted(HEAVY_MODULES)), json.dumps(sorted(ui_widgets()))], capture_output=True,
                         text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def stub_import(tmp_path_factory) -> dict:
    return import_with_stub_slicer(tmp_path_factory.mktemp("stub"), "5.10")


def test_the_module_refuses_to_run_in_slicer_older_than_5_10(stub_import, tmp_path):
    assert stub_import["version_problem"] is None
    assert stub_import["start"] == "InputError: Select an input volume."
    old = import_with_stub_slicer(tmp_path, "5.8")
    problem = old["version_problem"]
    assert "3D Slicer 5.10 or newer (this is Slicer 5.8)" in problem and "disabled" in problem
    assert old["help"].startswith(problem)  # said on load
    assert old["start"] == f"RuntimeError: {problem}" and old["unknown_plan"] == f"RuntimeError: {problem}"
    assert old["methods"] == []  # the package is not even imported


def test_packages_that_cannot_be_checked_are_an_error_not_all_installed(stub_import):
    assert stub_import["unknown_plan"] == f"DependencyError: {environment.UNKNOWN_PLAN}"


def test_loading_the_module_imports_nothing_heavy(stub_import):
    """Importing the module file, constructing the module and registering the sample data (what
    Slicer does on start-up) never even tries to import a heavy package: the stub interpreter's import
    guard refuses and records every attempt, including ones a try/except would hide."""
    assert stub_import["title"] == "MedAnomaly"
    assert stub_import["heavy_import_attempts"] == []
    loaded = stub_import["loaded_by_module"] + stub_import["loaded_by_registration"]
    heavy = {m.split(".")[0] for m in loaded} & HEAVY_MODULES
    assert not heavy, f"loading the module (and registering sample data) imported {heavy}"
    assert "MedAnomaly" in stub_import["loaded_by_module"]


def test_sample_data_is_registered_with_checksum_and_file_uri(stub_import):
    assert stub_import["signal"] == "startupCompleted()"
    (source,) = stub_import["registered"]
    assert source["sampleName"] == sampledata.SAMPLE_NAME and source["nodeNames"] == sampledata.SAMPLE_NAME
    assert source["checksums"] == f"SHA256:{sampledata.SAMPLE_SHA256}"
    assert source["uris"].startswith("file://") and source["uris"] == sampledata.sample_path().resolve().as_uri()
    assert source["fileNames"] == sampledata.SAMPLE_FILE
    assert Path(source["thumbnailFileName"]).is_file()


def test_logic_finds_the_checkout_and_its_bundles(stub_import):
    assert stub_import["source"] == str(REPO)
    # listing methods and checking packages (what opening the module panel does) loads no torch / MONAI
    loaded = {m.split(".")[0] for m in stub_import["loaded_by_logic"]}
    assert not loaded & {"torch", "monai", "SimpleITK", "itk", "ignite"}
    assert "dae" in stub_import["methods"]
    assert stub_import["plan_empty"]  # this venv has everything (medanomaly installed editable)


# ---------------------------------------------------------------------------------------------
# the module file, imported against the stub Slicer (STUB_SLICER)


def test_module_defines_the_four_slicer_classes_and_a_wrapped_parameter_node(stub_import):
    """The imported module's classes derive from Slicer's ScriptedLoadable* bases (stubbed), the
    parameter node class goes through @parameterNodeWrapper with the annotated node types, and the
    self-test class has the tests Slicer's "Reload and Test" runs."""
    classes = stub_import["classes"]
    expected = {"MedAnomaly": "ScriptedLoadableModule", "MedAnomalyWidget": "ScriptedLoadableModuleWidget",
                "MedAnomalyLogic": "ScriptedLoadableModuleLogic", "MedAnomalyTest": "TestCase"}
    for name, base in expected.items():
        assert name in classes, f"MedAnomaly.py lacks class {name}"
        assert base in classes[name], f"{name} must derive from {base}"
    assert "VTKObservationMixin" in classes["MedAnomalyWidget"]
    assert stub_import["parameter_node_wrapped"] == ["MedAnomalyParameterNode"]
    fields = stub_import["parameters"]
    assert fields["inputVolume"] == "vtkMRMLScalarVolumeNode"
    assert fields["brainMask"] == "vtkMRMLLabelMapVolumeNode"
    assert fields["anomalySegmentation"] == "vtkMRMLSegmentationNode"
    assert fields["heatmapVolume"] == fields["pseudoHealthyVolume"] == "vtkMRMLScalarVolumeNode"
    assert (fields["method"], fields["device"], fields["threshold"]) == ("str", "str", "float")
    for name in ("useCalibratedThreshold", "keepPreviousResults", "loadPseudoHealthy"):
        assert fields[name] == "bool", name
    assert {"setUp", "runTest", "test_MedAnomalyDetection"} <= set(stub_import["test_methods"])


def test_module_sits_in_slicers_translated_segmentation_category(stub_import):
    """The category is Slicer's own translation of "Segmentation" (context qSlicerAbstractCoreModule),
    so in a non-English Slicer the module is listed with the built-in segmentation modules: the
    stub Slicer translates that one (context, text) pair to "Segmentierung"."""
    assert stub_import["categories"] == ["Segmentierung"]


def test_sample_data_is_registered_only_once_startup_completed(stub_import):
    """Constructing the module registers nothing: it connects Slicer's startupCompleted() signal to
    registerSampleData, and the sample appears once that signal fires."""
    assert stub_import["signal"] == "startupCompleted()"
    assert stub_import["slot_is_registerSampleData"], f"connected to {stub_import['slot']}"
    assert stub_import["registered_before_startup"] == 0
    assert len(stub_import["registered"]) == 1


def test_slicers_process_never_imports_torch_and_installs_it_through_the_pytorch_extension(stub_import):
    """Throughout the stub run (loading, listing methods, checking and installing packages) torch,
    torchvision and monai are refused by an import guard and never asked for; a missing PyTorch is
    installed through the PyTorch extension (a stub PyTorchUtils), with Slicer's pins as $PIP_CONSTRAINT."""
    assert stub_import["torch_import_attempts"] == []
    assert stub_import["torch_installed"] == "returned"
    (call,) = stub_import["installed_torch"]
    assert call["askConfirmation"] is False
    assert call["torchVersionRequirement"] == environment.TORCH_REQUIREMENT
    assert call["PIP_CONSTRAINT"] and call["PIP_CONSTRAINT"].startswith("file://")


# ---------------------------------------------------------------------------------------------
# CMake


def cmake_list(path: Path, variable: str) -> list[str]:
    text = path.read_text()
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{path} does not set {variable}"
    return [item.replace("${MODULE_NAME}", "MedAnomaly") for item in match.group(1).split()]


def test_cmakelists_lists_every_script_and_resource():
    cmake = EXTENSION / "CMakeLists.txt"
    scripts = cmake_list(cmake, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(cmake, "MODULE_PYTHON_RESOURCES")
    on_disk_scripts = sorted(str(p.relative_to(EXTENSION)) for p in EXTENSION.rglob("*.py")
                             if "Testing" not in p.parts and "__pycache__" not in p.parts)
    on_disk_resources = sorted(str(p.relative_to(EXTENSION)) for p in (EXTENSION / "Resources").rglob("*")
                               if p.is_file())
    assert sorted(scripts) == on_disk_scripts
    assert sorted(resources) == on_disk_resources
    text = cmake.read_text()
    for needed in ("slicerMacroBuildScriptedModule(", "WITH_GENERIC_TESTS",
                   "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)", "set(MODULE_NAME MedAnomaly)"):
        assert needed in text
    # Slicer loads every .py at the top of a module folder as a module: only the module file is there
    assert [p.name for p in EXTENSION.glob("*.py")] == ["MedAnomaly.py"]


def test_top_level_cmakelists_has_the_extension_metadata():
    text = (REPO / "CMakeLists.txt").read_text()
    for variable in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                     "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf"^set\({variable} \"[^\"]+\"\)", text, re.M), variable
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    order = ["project(MedAnomaly)", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
             "add_subdirectory(MedAnomalyExtension)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
             "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.index(line) for line in order]
    assert positions == sorted(positions)
    icon = re.search(r"set\(EXTENSION_ICONURL \"\S*/(MedAnomalyExtension/Resources/Icons/[^\"]+\.png)\"\)", text)
    assert icon and (REPO / icon.group(1)).is_file()


STUB_SLICER_CONFIG = textwrap.dedent('''
    # A stand-in for Slicer's CMake package: records what the extension declares and checks files exist.
    set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
    set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/GenerateConfig.cmake")
    set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/CPack.cmake")
    set(BUILD_TESTING ON)
    set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.10/qt-scripted-modules")
    set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.10/qt-scripted-modules")
    set(RECORD "${CMAKE_BINARY_DIR}/record.txt")
    file(WRITE "${RECORD}" "")
    macro(slicerMacroBuildScriptedModule)
      cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
      if(MY_UNPARSED_ARGUMENTS)
        message(FATAL_ERROR "unknown arguments: ${MY_UNPARSED_ARGUMENTS}")
      endif()
      foreach(f ${MY_SCRIPTS} ${MY_RESOURCES})
        if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${f}")
          message(FATAL_ERROR "missing file ${f}")
        endif()
        get_filename_component(d "${f}" DIRECTORY)  # installed as Slicer's CTK macro lays them out
        install(FILES "${CMAKE_CURRENT_SOURCE_DIR}/${f}" DESTINATION "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${d}")
      endforeach()
      file(APPEND "${RECORD}" "module ${MY_NAME} generic_tests=${MY_WITH_GENERIC_TESTS}\\n")
      foreach(f ${MY_SCRIPTS})
        file(APPEND "${RECORD}" "script ${f}\\n")
      endforeach()
      foreach(f ${MY_RESOURCES})
        file(APPEND "${RECORD}" "resource ${f}\\n")
      endforeach()
    endmacro()
    function(slicer_add_python_unittest)
      cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
      file(APPEND "${RECORD}" "unittest ${MY_SCRIPT}\\n")
    endfunction()
''')


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                    reason="needs cmake and a C++ compiler")
def test_extension_configures_with_a_stub_slicer(tmp_path):
    stub = tmp_path / "slicer"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(STUB_SLICER_CONFIG)
    (stub / "UseSlicer.cmake").write_text("")
    (stub / "GenerateConfig.cmake").write_text(textwrap.dedent('''
        foreach(v EXTENSION_HOMEPAGE EXTENSION_CATEGORY EXTENSION_CONTRIBUTORS EXTENSION_DESCRIPTION
                  EXTENSION_ICONURL EXTENSION_SCREENSHOTURLS EXTENSION_DEPENDS)
          if(NOT DEFINED ${v})
            message(FATAL_ERROR "${v} is not set")
          endif()
          file(APPEND "${RECORD}" "meta ${v}=${${v}}\\n")
        endforeach()
    '''))
    (stub / "CPack.cmake").write_text('file(APPEND "${RECORD}" "cpack\\n")\n')
    build = tmp_path / "build"
    run = subprocess.run(["cmake", "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={stub}"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    record = (build / "record.txt").read_text().splitlines()
    assert "module MedAnomaly generic_tests=TRUE" in record
    assert "unittest MedAnomaly.py" in record
    assert "meta EXTENSION_DEPENDS=PyTorch" in record and record[-1] == "cpack"
    scripts = {line.split(" ", 1)[1] for line in record if line.startswith("script ")}
    assert "MedAnomaly.py" in scripts and "MedAnomalyLib/inference.py" in scripts

    # the install rules put the package source and every bundle under the module's Resources/medanomaly
    prefix = tmp_path / "install"
    run = subprocess.run(["cmake", "--install", str(build), "--prefix", str(prefix)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    module_dir = prefix / SCRIPTED_MODULES
    assert (module_dir / "MedAnomaly.py").is_file() and (module_dir / "MedAnomalyLib" / "environment.py").is_file()
    shipped = module_dir / "Resources" / "medanomaly"
    installed = sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*") if p.is_file())
    assert installed == sorted(package_file_list(tmp_path / "list.txt"))


SCRIPTED_MODULES = Path("lib", "Slicer-5.10", "qt-scripted-modules")  # Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR
PACKAGE_FILES_CMAKE = EXTENSION / "CMake" / "MedAnomalyPackageFiles.cmake"


def package_file_list(out: Path, root: Path = REPO) -> list[str]:
    """The files the extension ships under Resources/medanomaly, as CMake lists them at configure time."""
    run = subprocess.run(["cmake", f"-DMEDANOMALY_ROOT={root}", f"-DMEDANOMALY_FILE_LIST={out}", "-P",
                          str(PACKAGE_FILES_CMAKE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    return [line for line in out.read_text().splitlines() if line]


def shipped_bundles() -> list[Path]:
    return sorted(p.parent.parent for p in (REPO / "monai_bundles").glob("*/configs/metadata.json"))


needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")


@needs_cmake
def test_the_extension_ships_the_package_and_every_bundle_with_its_weights(tmp_path):
    files = package_file_list(tmp_path / "list.txt")
    assert len(files) == len(set(files))
    for needed in ("pyproject.toml", "README.md", "LICENSE", "core/medanomaly/__init__.py",
                   "core/medanomaly/bundles/registry.py", "core/medanomaly/weights/perceptual_backbone.pt"):
        assert needed in files, needed
    bundles = shipped_bundles()
    assert len(bundles) >= 7
    for bundle in bundles:
        name = bundle.name
        for needed in ("configs/metadata.json", "configs/inference.yaml", "configs/logging.conf", "LICENSE",
                       "models/model.pt", "models/model_info.json"):
            assert f"monai_bundles/{name}/{needed}" in files, f"{name}/{needed}"
        tracked = subprocess.run(["git", "ls-files", f"monai_bundles/{name}"], cwd=REPO, capture_output=True,
                                 text=True).stdout.split()
        assert not set(tracked) - set(files), f"{name}: committed files left out: {set(tracked) - set(files)}"
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or "/runs/" in f]


@needs_cmake
def test_the_shipped_file_list_leaves_out_caches_runs_and_checkpoints(tmp_path):
    root = tmp_path / "checkout"
    wanted = ["pyproject.toml", "README.md", "LICENSE", "core/medanomaly/__init__.py", "core/medanomaly/weights/w.pt",
              "monai_bundles/b/LICENSE", "monai_bundles/b/configs/metadata.json", "monai_bundles/b/models/model.pt",
              "monai_bundles/b/models/T2w/model.pt", "monai_bundles/b/scripts/network.py",
              "monai_bundles/b/docs/a b.md"]
    unwanted = ["core/medanomaly/__pycache__/__init__.cpython-312.pyc", "core/medanomaly/stale.pyc",
                "monai_bundles/b/scripts/__pycache__/network.cpython-312.pyc", "monai_bundles/b/runs/events.out",
                "monai_bundles/b/models/checkpoint_epoch=3.pt", "monai_bundles/b/models/checkpoint.pt",
                "monai_bundles/b/.pytest_cache/v/x", "monai_bundles/b/configs/.DS_Store",
                "monai_bundles/b/configs/inference.yaml~", "core/medanomaly.egg-info/PKG-INFO", "tests/test_x.py"]
    for name in wanted + unwanted:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    assert sorted(package_file_list(tmp_path / "list.txt", root)) == sorted(wanted)
    (root / "README.md").unlink()  # the package's build needs it: configuring fails
    with pytest.raises(AssertionError, match="is missing; the extension cannot ship"):
        package_file_list(tmp_path / "list.txt", root)


def lay_out_installed_extension(prefix: Path, files: list[str]) -> Path:
    """What `cmake --install` of the extension gives (see test_extension_configures_with_a_stub_slicer):
    the module's scripts and resources in Slicer's scripted-modules folder, the package files under
    Resources/medanomaly. Returns the module's folder."""
    module_dir = prefix / SCRIPTED_MODULES
    cmake = EXTENSION / "CMakeLists.txt"
    copies = [(EXTENSION / f, module_dir / f) for f in cmake_list(cmake, "MODULE_PYTHON_SCRIPTS")]
    copies += [(EXTENSION / f, module_dir / f) for f in cmake_list(cmake, "MODULE_PYTHON_RESOURCES")]
    copies += [(REPO / f, module_dir / "Resources" / "medanomaly" / f) for f in files]
    for source, target in copies:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return module_dir


INSTALLED_CHECK = textwrap.dedent('''
    # Run with python -I -S: no site-packages, no PYTHONPATH, so nothing of a checkout is visible.
    import json, sys
    module_dir, user_models = sys.argv[1], sys.argv[2]
    sys.path.insert(0, module_dir)
    from MedAnomalyLib import environment
    source = environment.find_source_folder()
    importable = environment.make_importable(source)
    bundle_path = environment.apply_bundle_path([], source)
    import medanomaly
    from medanomaly.bundles import list_bundles, registry
    from MedAnomalyLib import inference
    print(json.dumps({
        "source": str(source), "shipped": environment.is_shipped(source), "importable": importable,
        "package": medanomaly.__file__, "bundle_path": bundle_path,
        "search": [str(p) for p in registry.bundle_search_path()],
        "bundles": {b.name: {"root": str(b.root), "weights": b.has_weights} for b in list_bundles()},
        "methods": {m.key: str(m.weights_folder) for m in inference.available_methods(user_models)},
        "pip": environment.medanomaly_install_arguments(source),
        "sys_path": sys.path}))
''')


@needs_cmake
def test_an_installed_extension_finds_the_package_and_every_bundle_without_a_checkout(tmp_path):
    module_dir = lay_out_installed_extension(tmp_path / "Extensions" / "MedAnomaly",
                                             package_file_list(tmp_path / "list.txt"))
    shipped = (module_dir / "Resources" / "medanomaly").resolve()
    user_models = tmp_path / "settings" / "MedAnomaly" / "models"
    (user_models / "dae" / "mine").mkdir(parents=True)
    (user_models / "dae" / "mine" / "model.pt").write_bytes(b"weights")
    script = tmp_path / "check.py"
    script.write_text(INSTALLED_CHECK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDANOMALY")}
    run = subprocess.run([sys.executable, "-I", "-S", str(script), str(module_dir), str(user_models)],
                         capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert not any(str(REPO) in p for p in found["sys_path"])
    assert found["source"] == str(shipped) and found["shipped"] and found["importable"]
    assert found["package"].startswith(str(shipped / "core" / "medanomaly"))
    assert found["bundle_path"] == {"MEDANOMALY_BUNDLE_PATH": str(shipped / "monai_bundles")}
    assert found["search"][0] == str(shipped / "monai_bundles")
    assert all(str(REPO) not in p for p in found["search"])
    for bundle in shipped_bundles():
        listed = found["bundles"][bundle.name]
        assert listed["root"] == str(shipped / "monai_bundles" / bundle.name)
        assert listed["weights"] == (bundle / "models" / "model.pt").is_file()
    assert all(found["bundles"][b.name]["weights"] for b in shipped_bundles())  # every bundle ships weights
    assert found["methods"]["dae"] == str(shipped / "monai_bundles" / "dae" / "models")
    assert found["methods"]["dae:user/mine"] == str(user_models / "dae" / "mine")
    assert found["pip"] == ["--no-deps", str(shipped)]  # the shipped source, not a name from an index


# =============================================================================================
# MedAnomalyLib.environment


def test_source_folder_is_the_checkout_around_the_module(tmp_path, monkeypatch):
    monkeypatch.delenv(environment.SOURCE_FOLDER_ENV, raising=False)
    assert environment.find_source_folder() == REPO
    assert environment.find_source_folder(start=tmp_path) is None
    assert environment.find_source_folder(start=tmp_path, configured=REPO) == REPO
    monkeypatch.setenv(environment.SOURCE_FOLDER_ENV, str(REPO))
    assert environment.find_source_folder(start=tmp_path) == REPO
    assert environment.make_importable(REPO)


def test_source_folder_order_configured_then_shipped_then_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv(environment.SOURCE_FOLDER_ENV, raising=False)
    module_dir = tmp_path / "qt-scripted-modules"
    shipped = environment.shipped_folder(module_dir)
    (shipped / "core" / "medanomaly").mkdir(parents=True)
    (shipped / "core" / "medanomaly" / "__init__.py").write_text("")
    (shipped / "pyproject.toml").write_text(
        '[project]\nname = "medanomaly"\nversion = "9.1.0"\n\n[tool.x]\nversion = "0"\n')
    assert environment.find_source_folder(start=module_dir) == shipped.resolve()
    assert environment.find_source_folder(start=module_dir, configured=REPO) == REPO  # an explicit choice wins
    monkeypatch.setenv(environment.SOURCE_FOLDER_ENV, str(REPO))
    assert environment.find_source_folder(start=module_dir) == REPO
    assert environment.is_shipped(shipped, module_dir) and not environment.is_shipped(REPO, module_dir)
    assert environment.source_version(shipped) == "9.1.0" and environment.source_version(tmp_path) is None
    assert environment.medanomaly_install_arguments(shipped, module_dir) == ["--no-deps", str(shipped)]
    assert environment.medanomaly_install_arguments(REPO, module_dir) == ["--no-deps", "-e", str(REPO)]


def test_bundle_path_puts_extra_folders_first_and_restores_what_was_there(tmp_path):
    environ, state = {}, {"inherited": None, "applied": None}
    source = tmp_path / "shipped"
    (source / "monai_bundles").mkdir(parents=True)
    bundles = str(source / "monai_bundles")
    assert environment.apply_bundle_path([], source, environ, state) == {environment.BUNDLE_PATH_ENV: bundles}
    assert environ == {environment.BUNDLE_PATH_ENV: bundles}
    extra = environment.apply_bundle_path(["/mine"], source, environ, state)
    assert environ[environment.BUNDLE_PATH_ENV] == extra[environment.BUNDLE_PATH_ENV] == os.pathsep.join(
        ["/mine", bundles])
    assert environment.apply_bundle_path([], None, environ, state) == {} and environ == {}  # nothing of it stays
    environ[environment.BUNDLE_PATH_ENV] = "/set/by/user"  # e.g. before Slicer started
    environment.apply_bundle_path(["/mine"], source, environ, state)
    assert environ[environment.BUNDLE_PATH_ENV] == os.pathsep.join(["/mine", "/set/by/user", bundles])
    environment.apply_bundle_path([], None, environ, state)
    assert environ == {environment.BUNDLE_PATH_ENV: "/set/by/user"}
    assert environment.user_models_folder("/home/u/.config/NA-MIC") == Path("/home/u/.config/NA-MIC/MedAnomaly/models")


def test_version_gate():
    assert environment.version_problem((5, 10), (3, 12)) is None
    assert environment.version_problem((6, 0), (3, 10)) is None
    assert environment.version_problem(None, (3, 12)) is None  # Slicer's version unknown: Python decides
    both = environment.version_problem((5, 8), (3, 9))
    assert "3D Slicer 5.10 or newer (this is Slicer 5.8) and Python 3.10 or newer (this Slicer has Python 3.9)" in both
    assert "Python" not in environment.version_problem((5, 9), (3, 12))
    assert "Python 3.10 or newer" in environment.version_problem(None, (3, 9))
    assert environment.version_problem((5, 10)) is None  # this interpreter


def test_an_unknown_or_unfixable_plan_is_never_all_installed():
    with pytest.raises(environment.DependencyError, match="cannot check"):
        environment.needs_install(None)
    broken = environment.InstallPlan(problems=["medanomaly is not installed and its source was not found"])
    assert not broken.empty
    with pytest.raises(environment.DependencyError, match="source was not found"):
        environment.needs_install(broken)
    assert environment.needs_install(environment.InstallPlan()) is False
    assert environment.needs_install(environment.InstallPlan(packages=["monai>=1.6"], reasons=["r"])) is True
    assert environment.dependency_status(None)[0] is None
    assert environment.dependency_status(broken) == (False, broken.problems[0])
    assert environment.dependency_status(environment.InstallPlan()) == (True, "All installed.")
    missing = environment.InstallPlan(torch=["torch>=2.8"], reasons=["no torch"])
    assert environment.dependency_status(missing) == (
        False, "Missing (installed on the first Apply, after asking): no torch")


def test_requirements_relax_pins_and_leave_slicers_packages_alone():
    assert environment.relax("nibabel==5.4.2") == "nibabel>=5.4.2"
    assert environment.relax("scipy==1.17.1") == "scipy"
    assert environment.relax("monai[fire,itk]==1.6.1") == "monai[fire,itk]>=1.6.1"
    assert environment.relax("numpy==2.4.6") == "numpy"
    assert environment.relax("SimpleITK==2.5.7") == "SimpleITK"
    assert environment.relax("tqdm>=4.0,<5") == "tqdm<5,>=4.0"
    requirements = environment.requirements_from_pyproject(REPO / "pyproject.toml")
    names = {environment.canonical(r.split("[")[0].split(">")[0].split("<")[0].split("=")[0]) for r in requirements}
    assert "torch" not in names and "torchvision" not in names  # PyTorch comes through the PyTorch extension
    assert {"monai", "slicerio", "pytorch-ignite", "simpleitk"} <= names


def test_requirements_file_is_in_sync_with_pyproject():
    expected = environment.requirements_from_pyproject(REPO / "pyproject.toml")
    assert environment.read_requirements(environment.REQUIREMENTS_FILE) == expected, (
        "Resources/requirements.txt is out of date: run `python -m MedAnomalyLib.environment --write-requirements` "
        "in MedAnomalyExtension/")


def test_unsatisfied_requirements_say_why():
    assert environment.unsatisfied("numpy") is None
    assert environment.unsatisfied("monai[fire,pyyaml]>=1.0") is None
    assert "not installed" in environment.unsatisfied("no-such-package-medanomaly-test")
    assert "is needed" in environment.unsatisfied("numpy>=999")
    assert environment.unsatisfied("no-such-package; python_version < '3'") is None  # marker excludes it


def test_install_plan_orders_torch_packages_and_medanomaly(tmp_path, monkeypatch):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\nnumpy\nno-such-package-medanomaly-test>=1.0\n")
    plan = environment.install_plan(None, requirements)
    assert plan.torch == [] and plan.packages == ["no-such-package-medanomaly-test>=1.0"] and plan.medanomaly == []
    assert not plan.empty and "no-such-package" in plan.summary()

    real = environment.installed_version
    missing = {"torch", "medanomaly"}
    monkeypatch.setattr(environment, "installed_version", lambda name: None if name in missing else real(name))
    plan = environment.install_plan(REPO)
    assert plan.torch == ["torch" + environment.TORCH_REQUIREMENT]
    assert plan.medanomaly == ["--no-deps", "-e", str(REPO)]
    plan = environment.install_plan(None, requirements)
    assert plan.medanomaly == [] and not plan.empty  # never `pip install medanomaly` from an index
    assert "source was not found" in plan.problems[0] and "Cannot be installed" in plan.summary()
    missing.clear()  # installed, but an older version than the extension ships: installed again
    module_dir = tmp_path / "modules"
    shipped = environment.shipped_folder(module_dir)
    shutil.copytree(REPO / "core" / "medanomaly" / "bundles", shipped / "core" / "medanomaly" / "bundles")
    (shipped / "core" / "medanomaly" / "__init__.py").write_text("")
    (shipped / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text().replace(
        'version = "0.1.0"', 'version = "99.0"'))
    plan = environment.install_plan(shipped, module_dir=module_dir)
    assert plan.medanomaly == ["--no-deps", str(shipped.resolve())]
    assert "the extension ships 99.0" in plan.reasons[-1]


def test_pip_never_changes_slicers_numpy_scipy_simpleitk(tmp_path):
    installed = {"numpy": "1.26.4", "scipy": "1.13.1", "simpleitk": "2.4.0", "monai": "1.6.0", "pydicom": "2.4"}
    pins = environment.slicer_pins(installed)
    assert pins == {"numpy": "1.26.4", "scipy": "1.13.1", "SimpleITK": "2.4.0"}
    assert environment.slicer_pins({"numpy": "2.0"}) == {"numpy": "2.0"}  # what is not installed is not pinned
    with environment.constraints_file(pins) as constraints:
        text = constraints.read_text()
        requirements = ["monai[fire,itk]>=1.6.1", "numpy>=1.24", "scipy", "simpleitk<3", "nibabel>=5.4.2"]
        arguments = environment.pip_install_arguments(requirements, constraints, pins)
        for conflicting in ("numpy>=2", "SimpleITK==2.5.7", "scipy<1.13"):  # would need another version
            with pytest.raises(environment.DependencyError, match="must not change"):
                environment.pip_install_arguments(["monai", conflicting], constraints, pins)
        medanomaly = environment.pip_install_arguments(["--no-deps", "/opt/Slicer ext/Resources/medanomaly"],
                                                       constraints, pins)
    assert not constraints.exists()
    assert [line for line in text.splitlines() if not line.startswith("#")] == [
        "numpy==1.26.4", "scipy==1.13.1", "SimpleITK==2.4.0"]
    assert arguments == ["--constraint", str(constraints), "monai[fire,itk]>=1.6.1", "nibabel>=5.4.2"]
    assert medanomaly == ["--constraint", str(constraints), "--no-deps", "/opt/Slicer ext/Resources/medanomaly"]
    for upgrading in ("-U", "--upgrade", "--force-reinstall", "--ignore-installed", "--upgrade-strategy=eager"):
        with pytest.raises(ValueError, match="could change"):
            environment.pip_install_arguments([upgrading, "monai"], constraints, pins)
    # installers that run pip themselves get the same constraints through $PIP_CONSTRAINT, as a URL
    environ = {}
    spaced = tmp_path / "a folder" / "c.txt"
    with environment.pip_constraint_environment(spaced, environ):
        assert environ == {"PIP_CONSTRAINT": spaced.resolve().as_uri()} and " " not in environ["PIP_CONSTRAINT"]
    assert environ == {}


def test_the_module_installs_with_slicers_versions_pinned(stub_import):
    import numpy as numpy_module

    assert stub_import["installed"] == "returned"
    (packages, constraints), (medanomaly, _) = stub_import["pip_calls"]
    assert packages[:2] == ["--constraint", packages[1]] and packages[2:] == ["nibabel>=5.4"]
    assert medanomaly[2:] == ["--no-deps", "/opt/ext/Resources/medanomaly"]
    assert f"numpy=={numpy_module.__version__}" in constraints.splitlines()
    assert not [a for a in packages + medanomaly if a.lower().startswith(("numpy", "scipy", "simpleitk", "-u"))]
    assert stub_import["restart"] == []  # nothing was really installed


def test_the_shipped_package_is_built_from_a_temporary_copy(tmp_path):
    shipped = tmp_path / "Resources" / "medanomaly"
    for name in ("pyproject.toml", "README.md", "LICENSE", "core/medanomaly/__init__.py",
                 "core/medanomaly/__pycache__/x.pyc", "monai_bundles/dae/models/model.pt"):
        (shipped / name).parent.mkdir(parents=True, exist_ok=True)
        (shipped / name).write_text(name)
    with environment.staged_source(shipped) as staged:
        copied = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
        assert copied == ["LICENSE", "README.md", "core/medanomaly/__init__.py", "pyproject.toml"]
        (staged / "build").mkdir()  # what pip's in-place build leaves
    assert not staged.exists() and sorted(p.name for p in shipped.iterdir()) == [
        "LICENSE", "README.md", "core", "monai_bundles", "pyproject.toml"]


def test_a_restart_is_asked_for_when_a_loaded_package_changed():
    before = {"numpy": "2.1.0", "nibabel": "5.0", "tqdm": "4.0"}
    after = {"numpy": "2.1.0", "nibabel": "5.4.2", "monai": "1.6.1"}
    assert environment.changed_versions(before, after) == ["nibabel 5.0 -> 5.4.2", "tqdm 4.0 -> removed"]
    assert environment.changed_versions(before, after, only={"nibabel", "numpy"}) == ["nibabel 5.0 -> 5.4.2"]
    loaded = environment.loaded_distributions({"numpy": None, "numpy.linalg": None, "no_such_module": None})
    assert loaded == {"numpy"}
    assert "numpy" in environment.installed_versions() and "pytest" in environment.installed_versions()


def test_devices_offer_the_gpu_first_when_present():
    assert environment.device_choices([]) == [("CPU", "cpu")]
    choices = environment.device_choices(["NVIDIA H100, 81559 MiB"])
    assert [d for _, d in choices] == ["cuda", "cpu"] and "H100" in choices[0][0]
    assert environment.bundle_path_environment([]) == {}
    expected = {"MEDANOMALY_BUNDLE_PATH": os.pathsep.join(["/a", "/b"])}
    assert environment.bundle_path_environment(["/a", "/b"]) == expected


# =============================================================================================
# MedAnomalyLib.inputs


def test_input_checks_refuse_2d_4d_and_empty_volumes():
    inputs.check_input((82, 89, 84), 1)
    with pytest.raises(inputs.InputError, match="2D image"):
        inputs.check_input((256, 256, 1), 1)
    with pytest.raises(inputs.InputError, match="4 values per voxel"):
        inputs.check_input((64, 64, 64), 4)
    with pytest.raises(inputs.InputError, match="no image data"):
        inputs.check_input(None)
    eye = np.eye(4).tolist()
    inputs.check_same_grid((2, 3, 4), eye, (2, 3, 4), eye)
    shifted = np.eye(4)
    shifted[0, 3] = 1.0
    with pytest.raises(inputs.InputError, match="not on the input volume's grid"):
        inputs.check_same_grid((2, 3, 4), eye, (2, 3, 4), shifted.tolist())
    with pytest.raises(inputs.InputError):
        inputs.check_same_grid((2, 3, 4), eye, (2, 3, 5), eye)


# =============================================================================================
# MedAnomalyLib.inference


@pytest.fixture()
def inference():
    from MedAnomalyLib import inference

    return inference


def test_methods_come_from_the_bundles(inference):
    from medanomaly.bundles import find_bundle

    methods = {m.name: m for m in inference.available_methods()}
    dae = methods["dae"]
    bundle = find_bundle("dae")
    assert dae.has_weights == bundle.has_weights and dae.description == bundle.description
    assert dae.label == f"dae ({dae.weights_label})"
    assert bundle.description in dae.tooltip
    assert dae.threshold == bundle.model_info.get("threshold")


def test_user_weights_are_listed_beside_the_shipped_ones(inference, tmp_path):
    from medanomaly.bundles import find_bundle

    user_models = tmp_path / "MedAnomaly" / "models"
    (user_models / "dae" / "t1").mkdir(parents=True)
    (user_models / "dae" / "model.pt").write_bytes(b"weights")
    (user_models / "dae" / "model_info.json").write_text(json.dumps({"threshold": 0.5, "contrast": "T1w"}))
    (user_models / "dae" / "t1" / "model.pt").write_bytes(b"weights")
    (user_models / "dae" / "empty").mkdir()
    (user_models / "no-such-bundle" / "model.pt").parent.mkdir()
    methods = {m.key: m for m in inference.available_methods(user_models)}
    assert {"dae", "dae:user", "dae:user/t1"} <= set(methods)
    assert not [k for k in methods if "empty" in k or "no-such-bundle" in k]
    mine = methods["dae:user"]
    assert mine.name == "dae" and mine.model_dir == user_models / "dae" and mine.has_weights
    assert mine.label == "dae (your weights)" and methods["dae:user/t1"].label == "dae (your weights: t1)"
    assert mine.threshold == 0.5 and mine.contrast == "T1w" and not mine.demo_weights
    assert str(user_models / "dae") in mine.tooltip
    assert methods["dae"].model_dir is None and methods["dae"].weights_folder == find_bundle("dae").model_dir
    assert inference.method_by_name("dae:user/t1", user_models) == methods["dae:user/t1"]
    assert inference.method_by_name("dae") == methods["dae"]
    with pytest.raises(LookupError):
        inference.method_by_name("dae:user/nope", user_models)
    assert set(inference.available_methods()) == {m for m in methods.values() if m.model_dir is None}
    # a run with them: the bundle with --model_dir (their own model_info.json decides the demo overlay)
    command = inference.DetectionRequest("dae", tmp_path / "i.nrrd", tmp_path / "o", model_dir=mine.model_dir).command()
    assert command[command.index("--model_dir") + 1] == "$" + repr(str(user_models / "dae"))
    assert "demo.yaml" not in command[command.index("--config_file") + 1]


def test_command_is_the_bundles_inference_with_the_modules_overrides(inference, tmp_path):
    from medanomaly.bundles import bundle_command

    request = inference.DetectionRequest("dae", tmp_path / "input.nrrd", tmp_path / "output", device="cpu",
                                         threshold=0.25, python="/opt/Slicer/bin/PythonSlicer")
    command = request.command()
    assert command[:4] == ["/opt/Slicer/bin/PythonSlicer", "-m", "monai.bundle", "run"]
    assert command == bundle_command("dae", "inference", overrides=request.overrides(),
                                     python="/opt/Slicer/bin/PythonSlicer")

    def value(flag):
        return command[command.index(flag) + 1]

    def literal(text):  # how a string reaches MONAI's parser: a quoted config expression
        return "$" + repr(str(text))

    assert value("--input") == literal(tmp_path / "input.nrrd")
    assert value("--output_dir") == literal(tmp_path / "output")
    assert value("--output_ext") == literal(".nrrd") and value("--device") == literal("cpu")
    assert value("--amp") == "False"
    assert value("--threshold") == "0.25"
    assert "--mask" not in command and "--model_dir" not in command
    assert "inference.yaml" in value("--config_file")

    gpu = inference.DetectionRequest("dae", tmp_path / "input.nrrd", tmp_path / "o", device="cuda",
                                     mask_file=tmp_path / "mask.nrrd").command()
    assert "--threshold" not in gpu and "--amp" not in gpu  # calibrated threshold, the config's own amp
    # options left unset are not even keys: a model_dir key would drop the shipped weights' demo overlay
    assert set(inference.DetectionRequest("dae", tmp_path / "i.nrrd", tmp_path / "o").overrides()) == {
        "input", "output_dir", "output_ext", "device", "amp"}
    assert gpu[gpu.index("--mask") + 1] == "$" + repr(str(tmp_path / "mask.nrrd"))
    assert gpu[0] == sys.executable  # outside Slicer: this Python
    with pytest.raises(ValueError, match="Unknown device"):
        inference.DetectionRequest("dae", tmp_path / "i.nrrd", tmp_path, device="mps")
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            inference.DetectionRequest("dae", tmp_path / "i.nrrd", tmp_path, threshold=bad)


def test_missing_weights_are_reported_before_launching(inference, tmp_path):
    folder = inference.WorkFolder.create(tmp_path)
    folder.input_file.write_bytes(b"")
    request = inference.DetectionRequest("dae", folder.input_file, folder.output_dir, model_dir=tmp_path / "empty")
    with pytest.raises(inference.DetectionError, match="no trained weights"):
        inference.check_ready(request)
    assert folder.output_dir.is_dir() and folder.root.name.startswith("MedAnomaly-")
    folder.remove()
    assert not folder.root.exists()


def test_job_streams_log_and_progress_from_a_child_process(inference):
    code = ("from medanomaly.bundles import report_progress\n"
            "print('loading', flush=True)\n"
            "report_progress(0.25, 'volume 1/1 input: slices 24/96')\n"
            "print('working', flush=True)\n"
            "report_progress(1.0, 'volume 1/1 input: slices 96/96')\n")
    job = inference.DetectionJob([sys.executable, "-c", code])
    updates = []
    assert job.wait(on_update=updates.append, interval=0.02, timeout=60) == 0
    lines = [line for u in updates for line in u.lines]
    assert lines == ["loading", "working"]  # progress lines go to the progress bar, not the log
    fractions = [u.fraction for u in updates if u.fraction is not None]
    assert fractions[-1] == 1.0 and job.message == "volume 1/1 input: slices 96/96"
    assert updates[-1].finished and updates[-1].returncode == 0
    assert job.poll().finished  # stays finished


def test_poll_never_blocks(inference):
    job = inference.DetectionJob([sys.executable, "-c", "import time; print('a', flush=True); time.sleep(30)"])
    start = time.monotonic()
    for _ in range(5):
        job.poll()
    assert time.monotonic() - start < 1.0
    job.cancel(grace_seconds=1)


def test_failure_gives_a_sentence_and_the_log(inference):
    job = inference.DetectionJob([sys.executable, "-c",
                                  "print('step 1'); raise RuntimeError('CUDA out of memory. Tried to allocate 2 GiB')"])
    job.wait(timeout=60)
    with pytest.raises(inference.DetectionError) as error:
        job.result()
    assert "GPU ran out of memory" in error.value.message and "choose CPU" in error.value.message
    assert "step 1" in error.value.log and error.value.returncode == 1


@pytest.mark.parametrize("returncode, log, expected", [
    (1, "RuntimeError: No weights at /x/models/model.pt: train the bundle first",
     "no trained weights (/x/models/model.pt"),
    (1, "medanomaly.io.VolumeError: 'in.nrrd' is constant (every voxel is 0.0): there is no image content.",
     "The input cannot be used: 'in.nrrd' is constant"),
    (1, "AssertionError: Torch not compiled with CUDA enabled", "PyTorch cannot use the GPU"),
    (1, "ModuleNotFoundError: No module named 'monai'", "missing in Slicer's Python (monai)"),
    (1, "MemoryError", "ran out of memory"),
    (-9, "", "stopped by the operating system"),
    (2, "something else", "failed (exit code 2). The log below says why"),
])
def test_failure_explanations(inference, returncode, log, expected):
    assert expected in inference.explain_failure(returncode, log)


def test_failure_messages_name_the_input_volume_not_the_work_file(inference, tmp_path):
    request = inference.DetectionRequest("dae", tmp_path / "input.nrrd", tmp_path / "output")
    code = (f"print('medanomaly.io.VolumeError: ' + repr({str(request.input_file)!r}) + "
            "' has size (64, 64, 1): it is a single slice'); raise SystemExit(1)")
    job = inference.DetectionJob([sys.executable, "-c", code], request=request)
    job.wait(timeout=60)
    with pytest.raises(inference.DetectionError) as error:
        job.result()
    expected = "The input cannot be used: the input volume has size (64, 64, 1): it is a single slice"
    assert error.value.message == expected


def test_other_failures_name_the_root_cause(inference):
    if inference.root_cause is None:
        pytest.skip("this medanomaly has no bundles.runner.root_cause")
    log = "Traceback (most recent call last):\n  File x\nKeyError: 'image'\nRuntimeError: Failed to evaluate"
    assert inference.explain_failure(1, log) == "The method failed (exit code 1): KeyError: 'image'"


def test_cancel_ends_the_whole_process_tree(inference, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "print('started', flush=True)\n"
            "time.sleep(120)\n")
    job = inference.DetectionJob([sys.executable, "-c", code])
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.monotonic() < deadline, "the child process did not start"
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    job.cancel(grace_seconds=2)
    update = job.poll()
    assert update.finished and job.cancelled
    with pytest.raises(inference.DetectionCancelled):
        job.result()
    for _ in range(100):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the grandchild process survived cancel()")


def test_read_result_uses_detections_json(inference, tmp_path):
    request = inference.DetectionRequest("dae", tmp_path / "input.nrrd", tmp_path / "out")
    expected = request.expected_outputs()
    assert {k: p.name for k, p in expected.items()} == {
        "heatmap": "input_heatmap.nrrd", "segmentation": "input_anomaly.seg.nrrd",
        "pseudo_healthy": "input_pseudo_healthy.nrrd"}
    request.output_dir.mkdir()
    with pytest.raises(inference.DetectionError, match="no heatmap"):
        inference.read_result(request)
    expected["heatmap"].write_bytes(b"x")
    expected["segmentation"].write_bytes(b"x")
    (request.output_dir / "detections.json").write_text(json.dumps([{
        "subject": "input", "threshold": 0.3, "volume_score": 0.01,
        "heatmap": str(expected["heatmap"]), "segmentation": str(expected["segmentation"])}]))
    result = inference.read_result(request)
    files = (result.heatmap, result.segmentation, result.pseudo_healthy)
    assert files == (expected["heatmap"], expected["segmentation"], None)
    assert result.threshold == 0.3 and result.volume_score == 0.01


# =============================================================================================
# MedAnomalyLib.results


def test_threshold_to_labelmap():
    heatmap = np.array([[[0.0, 0.1], [0.2, 0.3]], [[0.4, 0.5], [0.6, 0.7]]], dtype=np.float32)
    labelmap = results.threshold_to_labelmap(heatmap, 0.3)
    assert labelmap.dtype == np.uint8 and labelmap.shape == heatmap.shape
    assert labelmap.ravel().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # strictly above, like the bundles
    assert results.threshold_to_labelmap(heatmap, 0).sum() == 7  # never the zero background
    brain = np.zeros_like(heatmap)
    brain[1, 1] = 1
    assert results.threshold_to_labelmap(heatmap, 0.3, brain).ravel().tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    for bad in (-1, float("nan"), float("inf"), "high", None):
        with pytest.raises(ValueError, match="threshold"):
            results.threshold_to_labelmap(heatmap, bad)
    with pytest.raises(ValueError, match="shape"):
        results.threshold_to_labelmap(heatmap, 0.1, brain[0])


def test_threshold_helpers():
    rng = np.random.default_rng(0)
    heatmap = np.zeros((20, 20, 20), dtype=np.float32)
    heatmap[5:15, 5:15, 5:15] = rng.uniform(0.01, 1.0, (10, 10, 10))
    suggested = results.suggest_threshold(heatmap)
    assert results.voxel_count(results.threshold_to_labelmap(heatmap, suggested)) == pytest.approx(10, abs=2)
    assert results.suggest_threshold(np.zeros((3, 3, 3))) == 0.0
    assert results.slider_range(None) == (0.0, 1.0, 0.001, 3)
    assert results.slider_range(0.12) == (0.0, 0.24, 0.0001, 4)
    low, high, step, decimals = results.slider_range(0.8, heatmap_max=3.7)
    assert low == 0.0 and high >= 3.7 and step == pytest.approx(0.001) and decimals == 3
    assert results.slider_range(0.12, heatmap_max=0.9)[1:] == (0.9, 0.0001, 4)
    assert results.slider_range(40.0)[1:] == (80.0, 0.01, 2)
    assert results.slider_range(0.00042)[1:] == (0.00084, 1e-7, 7)  # small scores stay reachable
    window = results.display_window(heatmap, threshold=0.9)
    assert window[0] == 0.0 and window[1] >= 1.8
    assert results.display_window(np.zeros((2, 2, 2))) == (0.0, 1.0)


def test_segment_terminology_and_terminology_file_agree():
    entry = results.terminology_entry()
    parts = entry.split("~")
    assert len(parts) == 7 and parts[0] == results.TERMINOLOGY_CONTEXT
    assert parts[1] == "SCT^49755003^Morphologically Altered Structure" and parts[2] == "SCT^52988006^Lesion"
    assert parts[4] == "Anatomic codes - DICOM master list" and parts[5] == "SCT^12738006^Brain"
    term = json.loads((EXTENSION / "Resources" / "SegmentationCategoryTypeModifier-MedAnomaly.term.json").read_text())
    assert term["SegmentationCategoryTypeContextName"] == results.TERMINOLOGY_CONTEXT
    (category,) = term["SegmentationCodes"]["Category"]
    (kind,) = category["Type"]
    assert (category["CodingSchemeDesignator"], category["CodeValue"], category["CodeMeaning"]) == results.CATEGORY
    assert (kind["CodingSchemeDesignator"], kind["CodeValue"], kind["CodeMeaning"]) == results.TYPE
    assert kind["recommendedDisplayRGBValue"] == [round(255 * c) for c in results.SEGMENT_COLOR]


def test_segment_name_and_colour_match_what_the_bundles_write():
    import inspect

    from medanomaly import io

    defaults = inspect.signature(io.write_segmentation).parameters
    assert defaults["name"].default == results.SEGMENT_NAME
    assert tuple(defaults["color"].default) == results.SEGMENT_COLOR


def test_heatmap_check():
    results.check_heatmap(np.zeros((2, 2, 2), dtype=np.float32))
    for bad in (np.array([[[np.nan]]]), np.array([[[np.inf, 0.0]]]), np.zeros((0, 2, 2)), np.array([["a"]])):
        with pytest.raises(ValueError):
            results.check_heatmap(bad)


class FakeNode:
    """Just what SceneTransaction and the removal helpers call on an MRML node."""

    def __init__(self, name, singleton=None, display=(), storage=None):
        self.name, self.singleton, self.display, self.storage = name, singleton, list(display), storage
        self.id, self.value = None, "original"

    def GetID(self):
        return self.id

    def GetSingletonTag(self):
        return self.singleton

    def GetNumberOfDisplayNodes(self):
        return len(self.display)

    def GetNthDisplayNode(self, i):
        return self.display[i]

    def GetStorageNode(self):
        return self.storage


class FakeScene:
    def __init__(self):
        self.nodes, self.count = [], 0

    def AddNode(self, node):
        self.count += 1
        node.id = f"vtkMRMLNode{self.count}"
        self.nodes.append(node)
        return node

    def load(self, name):
        """A node loaded from a file: with a display node and a storage node, added first."""
        display, storage = self.AddNode(FakeNode(name + " display")), self.AddNode(FakeNode(name + " storage"))
        return self.AddNode(FakeNode(name, display=[display], storage=storage))

    def GetNumberOfNodes(self):
        return len(self.nodes)

    def GetNthNode(self, i):
        return self.nodes[i]

    def IsNodePresent(self, node):
        return node in self.nodes

    def RemoveNode(self, node):
        self.nodes.remove(node)

    def names(self):
        return [n.name for n in self.nodes]


def test_a_failed_or_cancelled_run_leaves_the_scene_as_it_was():
    scene = FakeScene()
    given = scene.AddNode(FakeNode("my heatmap"))
    scene.AddNode(FakeNode("input"))
    before = scene.names()
    for failure in (RuntimeError("the segmentation has no segment"), KeyboardInterrupt()):
        # 1. reading fails: the nodes loaded so far (with their display and storage nodes) go
        with pytest.raises(type(failure)):
            with results.SceneTransaction(scene) as transaction:
                scene.load("heatmap")
                scene.AddNode(FakeNode("parameters", singleton="MedAnomaly"))  # created on first use: stays
                raise failure
        assert scene.names() == before + ["parameters"]
        scene.RemoveNode(scene.nodes[-1])
        # 2. replacing fails after a given node changed: it is restored, new nodes go
        with pytest.raises(type(failure)):
            with results.SceneTransaction(scene) as transaction:
                loaded = scene.load("heatmap")
                transaction.on_undo(lambda: setattr(given, "value", "original"))
                given.value = "replaced"
                transaction.on_undo(lambda: 1 / 0)  # a failing undo step does not stop the others
                scene.AddNode(FakeNode("segmentation"))
                raise failure
        assert scene.names() == before and given.value == "original" and not scene.IsNodePresent(loaded)
    # success: the new nodes and the changes stay, temporary nodes are removed with their display / storage
    with results.SceneTransaction(scene) as transaction:
        loaded = scene.load("heatmap")
        transaction.on_undo(lambda: setattr(given, "value", "original"))
        given.value = "replaced"
        temporary = scene.load("segmentation file")
        assert results.remove_nodes(scene, results.node_with_display_and_storage(temporary)) == 3
    assert scene.names() == before + ["heatmap display", "heatmap storage", "heatmap"] and given.value == "replaced"
    assert results.remove_nodes(scene, [temporary, None]) == 0


def test_finish_detection_reads_and_checks_everything_before_touching_given_nodes():
    """The order in MedAnomaly.py that SceneTransaction relies on: every output is read and checked
    (`_readOutputs`, which only makes new nodes) inside the transaction before any output node
    changes, and every change of a given node registers its undo step first."""
    functions = {n.name: n for n in ast.walk(module_tree()) if isinstance(n, ast.FunctionDef)}

    def calls(node):  # names of the methods called, in source order, outside nested functions (undo steps)
        found, todo = [], list(ast.iter_child_nodes(node))
        while todo:
            child = todo.pop()
            if isinstance(child, (ast.FunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                found.append(child)
            todo.extend(ast.iter_child_nodes(child))
        return [c.func.attr for c in sorted(found, key=lambda c: (c.lineno, c.col_offset))]

    (block,) = [n for n in ast.walk(functions["finishDetection"]) if isinstance(n, ast.With)
                and "SceneTransaction" in ast.unparse(n.items[0].context_expr)]
    inside = calls(ast.Module(body=block.body, type_ignores=[]))
    assert inside[0] == "_readOutputs"
    assert {"_adoptVolume", "_adoptSegmentation"} <= set(inside)
    changing = {"_adoptVolume", "_adoptSegmentation", "_moveAnomalySegment", "_prepareSegmentation",
                "SetAndObserveImageData", "CopyOrientation", "_placeBeside", "RemoveSegment", "SetName"}
    assert not changing & set(calls(functions["_readOutputs"]))
    volume = calls(functions["_adoptVolume"])
    assert volume.index("on_undo") < volume.index("SetAndObserveImageData")
    assert volume.index("_undoPlacement") < volume.index("CopyOrientation")
    segmentation = calls(functions["_adoptSegmentation"])
    assert segmentation.index("_undoSegmentationChanges") < segmentation.index("_moveAnomalySegment")
    assert "on_undo" in calls(functions["_undoSegmentationChanges"])
    # the failure paths of the panel: a cancelled or failed run never reaches the scene
    source = MODULE_FILE.read_text()
    assert source.index("result = task.job.result()") < source.index("with results.SceneTransaction(slicer.mrmlScene)")


# =============================================================================================
# result files on the input grid, and the sample data


def test_result_files_read_back_on_the_input_grid(tmp_path):
    """What the bundle writes for a .nrrd input (heatmap and .seg.nrrd through medanomaly.io)
    reads back, with SimpleITK and slicerio as Slicer reads it, on exactly the input's grid."""
    import SimpleITK as sitk
    import slicerio

    from medanomaly import io
    from medanomaly.bundles.outputs import output_paths

    source = sitk.ReadImage(str(sampledata.sample_path()))
    image = io.volume_array(io.read_volume(sampledata.sample_path()))
    heatmap = (image / image.max()).astype(np.float32)
    paths = output_paths(tmp_path, "input", ".nrrd")
    io.write_heatmap(heatmap, sampledata.sample_path(), paths["heatmap"])
    io.write_segmentation(results.threshold_to_labelmap(heatmap, 0.5), sampledata.sample_path(), paths["segmentation"])

    written = sitk.ReadImage(str(paths["heatmap"]))
    for attribute in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(written, attribute)(), getattr(source, attribute)(), atol=1e-5), attribute
    segmentation = slicerio.read_segmentation(str(paths["segmentation"]))
    (segment,) = segmentation["segments"]
    assert segment["name"] == results.SEGMENT_NAME
    assert np.allclose(segment["color"], results.SEGMENT_COLOR)
    _, ijk_to_ras = sampledata.read_nrrd(sampledata.sample_path())
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras
    assert np.allclose(segmentation["ijkToLPS"], lps, atol=1e-5)
    voxels = np.asarray(segmentation["voxels"])
    assert voxels.shape == image.shape
    assert np.array_equal(voxels > 0, heatmap > 0.5)


def test_sample_volume_is_small_checksummed_and_readable():
    import SimpleITK as sitk

    path = sampledata.sample_path()
    assert path.is_file() and path.stat().st_size < 1_000_000
    assert sampledata.sha256(path) == sampledata.SAMPLE_SHA256, (
        "the sample volume changed: update SAMPLE_SHA256 in MedAnomalyLib/sampledata.py")
    assert sampledata.checksum() == f"SHA256:{sampledata.SAMPLE_SHA256}"
    uri = sampledata.file_uri(path)
    assert uri.startswith("file://") and uri.endswith(sampledata.SAMPLE_FILE)
    array, ijk_to_ras = sampledata.read_nrrd(path)
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == array.shape and image.GetPixelIDTypeAsString() == "16-bit signed integer"
    assert np.array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), array)
    assert np.allclose(image.GetSpacing(), sampledata.SPACING_MM, atol=1e-4)
    assert not np.allclose(np.reshape(image.GetDirection(), (3, 3)), np.diag([-1, -1, 1]), atol=1e-3)  # oblique
    lesion, lesion_grid = sampledata.read_nrrd(sampledata.lesion_path())
    assert np.allclose(lesion_grid, ijk_to_ras) and lesion.shape == array.shape
    assert lesion.sum() > 1000 and np.all(array[lesion > 0] > 0)  # a tumour, inside the brain
    assert (array == 0).mean() > 0.2  # skull-stripped: zero outside the brain


def test_sample_volume_is_regenerated_identically(tmp_path):
    fresh = sampledata.write_sample(tmp_path, tmp_path)
    for key, committed in (("image", sampledata.sample_path()), ("lesion", sampledata.lesion_path())):
        new_array, new_grid = sampledata.read_nrrd(fresh[key])
        old_array, old_grid = sampledata.read_nrrd(committed)
        # floating-point rounding may differ on another CPU: one intensity unit, a few mask voxels
        hint = f"{key}: regenerate with `python -m MedAnomalyLib.sampledata`"
        assert new_array.shape == old_array.shape, hint
        assert np.abs(new_array.astype(float) - old_array.astype(float)).max() <= 1, hint
        assert np.mean(new_array != old_array) < 1e-3, hint
        assert np.allclose(new_grid, old_grid, atol=1e-5)


# =============================================================================================
# end to end: the module's command on the sample volume


def run_detection(tmp_path, **request_options):
    """What MedAnomalyLogic.startDetection / finishDetection do, minus Slicer: the input saved as
    input.nrrd in a work folder, the request, the background job, its result."""
    from MedAnomalyLib import inference

    folder = inference.WorkFolder.create(tmp_path)
    shutil.copyfile(sampledata.sample_path(), folder.input_file)
    request = inference.DetectionRequest("dae", folder.input_file, folder.output_dir, device="cpu",
                                         python=sys.executable, **request_options)
    inference.check_ready(request)
    job = inference.DetectionJob.start(request)
    fractions = []
    job.wait(on_update=lambda u: fractions.append(u.fraction) if u.fraction is not None else None, timeout=600)
    result = job.result()
    return request, job, result, fractions


def check_outputs_on_input_grid(result):
    import SimpleITK as sitk
    import slicerio

    source = sitk.ReadImage(str(sampledata.sample_path()))
    heatmap_image = sitk.ReadImage(str(result.heatmap))
    for attribute in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert np.allclose(getattr(heatmap_image, attribute)(), getattr(source, attribute)(), atol=1e-4), attribute
    heatmap = sitk.GetArrayFromImage(heatmap_image).transpose(2, 1, 0)
    assert heatmap.dtype == np.float32 and heatmap.min() >= 0 and heatmap.max() > 0
    assert result.segmentation is not None
    segmentation = slicerio.read_segmentation(str(result.segmentation))
    (segment,) = segmentation["segments"]
    assert segment["name"] == "Anomaly" and np.allclose(segment["color"], results.SEGMENT_COLOR)
    voxels = np.asarray(segmentation["voxels"])
    _, ijk_to_ras = sampledata.read_nrrd(sampledata.sample_path())
    assert voxels.shape == heatmap.shape
    assert np.allclose(segmentation["ijkToLPS"], np.diag([-1.0, -1.0, 1.0, 1.0]) @ ijk_to_ras, atol=1e-4)
    # the module's own threshold -> labelmap gives exactly the bundle's segmentation
    assert np.array_equal(voxels > 0, results.threshold_to_labelmap(heatmap, result.threshold) > 0)
    return heatmap, voxels


@pytest.mark.skipif(__import__("medanomaly.bundles", fromlist=["find_bundle"]).find_bundle("dae").has_weights,
                    reason="the shipped dae weights exist: test_end_to_end_with_the_shipped_weights covers the run")
def test_end_to_end_plumbing_with_untrained_weights(tmp_path, monkeypatch):
    """Until the dae weights are trained: a copy of the dae bundle with freshly initialised weights
    of its demo network and a made-up calibrated threshold, found first on the bundle path. The
    command is then the one the module builds for shipped demo weights (demo overlay, calibrated
    threshold): files, names, geometry and segment metadata of a real run."""
    import torch
    import yaml
    from monai.networks.nets import UNet

    from medanomaly.bundles import find_bundle

    shipped = find_bundle("dae")
    copy = tmp_path / "bundles" / "dae"
    shutil.copytree(shipped.root, copy, ignore=shutil.ignore_patterns("models", "__pycache__"))
    network = yaml.safe_load(shipped.config_file("inference").read_text())["network_def"]
    network["channels"] = yaml.safe_load(shipped.config_file("demo").read_text())["network_def#channels"]
    torch.manual_seed(0)
    (copy / "models").mkdir()
    untrained = UNet(**{k: v for k, v in network.items() if k != "_target_"})
    torch.save(untrained.state_dict(), copy / "models" / "model.pt")
    info = {"configs": ["train.yaml", "demo.yaml"], "threshold": 0.05}
    (copy / "models" / "model_info.json").write_text(json.dumps(info))
    monkeypatch.setenv("MEDANOMALY_BUNDLE_PATH", str(copy.parent))
    assert find_bundle("dae").root == copy.resolve()

    request, job, result, fractions = run_detection(tmp_path)
    command = request.command()
    assert "demo.yaml" in command[command.index("--config_file") + 1] and "--threshold" not in command
    assert fractions and fractions[-1] == pytest.approx(1.0)
    assert result.threshold == 0.05  # the calibrated one, from models/model_info.json
    check_outputs_on_input_grid(result)


@pytest.mark.skipif(not __import__("medanomaly.bundles", fromlist=["find_bundle"]).find_bundle("dae").has_weights,
                    reason="the dae bundle has no weights yet (monai_bundles/dae/models/model.pt): train it with "
                           "`medanomaly train dae --demo`; test_end_to_end_plumbing_with_untrained_weights runs "
                           "instead")
def test_end_to_end_with_the_shipped_weights(tmp_path):
    """Exactly what the module runs (calibrated threshold, shipped weights, CPU) on the sample."""
    from medanomaly.bundles import find_bundle

    request, job, result, fractions = run_detection(tmp_path)
    assert "--threshold" not in request.command()  # the calibrated one
    assert result.threshold == pytest.approx(find_bundle("dae").model_info["threshold"])
    assert fractions and fractions[-1] == pytest.approx(1.0)
    heatmap, voxels = check_outputs_on_input_grid(result)
    assert voxels.sum() > 0, "the Anomaly segment is empty"
    lesion, _ = sampledata.read_nrrd(sampledata.lesion_path())
    brain = heatmap > 0
    assert heatmap[lesion > 0].mean() > heatmap[brain & (lesion == 0)].mean(), "the lesion does not stand out"


def test_requirements_without_a_toml_reader_come_from_the_shipped_file(monkeypatch):
    """Slicer 5.8's Python 3.9 has no tomllib: the install plan must still list the packages."""
    expected = environment.requirements_from_pyproject(REPO / "pyproject.toml")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` raises ImportError
    monkeypatch.setitem(sys.modules, "tomli", None)
    assert environment.requirements_from_pyproject(REPO / "pyproject.toml") == expected
