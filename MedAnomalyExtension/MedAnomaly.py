"""MedAnomaly: unsupervised lesion detection in brain MRI, as a 3D Slicer scripted module.

Pick a volume and a method (one MONAI bundle each), press Apply: the bundle's inference runs
in a background PythonSlicer process, and its anomaly heatmap and "Anomaly" segmentation come
back as nodes on the input's grid. Nothing heavy is imported when Slicer starts: PyTorch and
MONAI are only ever imported by the background process, and the Python packages are checked
(and, after asking, installed) on the first Apply.

The Slicer-free parts live in MedAnomalyLib (tested with pytest, without Slicer).
"""

import logging
import os

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#
# MedAnomaly
#


class MedAnomaly(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedAnomaly")
        # "Segmentation": the module's result is a lesion segmentation (with its heatmap), next to
        # the other AI segmentation modules (TotalSegmentator, MONAI Auto3DSeg).
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedAnomaly developers"]
        self.parent.helpText = _("""
Unsupervised lesion detection in brain MRI. Each method learned what healthy brains look like;
it reconstructs a pseudo-healthy version of the selected volume and shows where the scan departs
from it, as an anomaly heatmap and an "Anomaly" segment, on the input's grid.
Choose a volume, a method and a device, press Apply. Move the threshold afterwards to update the
segmentation without running the network again.
See MedAnomalyExtension/README.md in the MedAnomaly repository for the documentation.
Research use only: not for clinical decisions.
""")
        self.parent.acknowledgementText = _("""
Built on MONAI bundles, PyTorch and 3D Slicer. The sample volume is synthetic (made from the MNI152
template shipped with nilearn), not patient data.
""")
        problem = versionProblem()
        if problem:  # said when the module loads; the panel repeats it and keeps Apply disabled
            logging.warning(f"MedAnomaly: {problem}")
            self.parent.helpText = problem + "\n" + self.parent.helpText

        # Sample data is registered once the application has started (the module must not slow down start-up).
        slicer.app.connect("startupCompleted()", registerSampleData)


def slicerVersion():
    """(major, minor) of the running Slicer, or None when it cannot be read."""
    try:
        return int(slicer.app.majorVersion), int(slicer.app.minorVersion)
    except (AttributeError, TypeError, ValueError):
        return None


def versionProblem():
    """Why MedAnomaly cannot run in this Slicer (too old a Slicer or Python), or None."""
    from MedAnomalyLib import environment

    return environment.version_problem(slicerVersion())


#
# Register sample data sets in Sample Data module
#


def registerSampleData():
    """Adds the module's synthetic lesion volume to the Sample Data module (a local file://
    source, checked against its SHA256)."""
    import SampleData

    from MedAnomalyLib import sampledata

    path = sampledata.sample_path()
    if not path.is_file():
        logging.warning(f"MedAnomaly sample data is missing ({path}); it is not registered.")
        return
    logic = SampleData.SampleDataLogic
    existing = getattr(slicer.modules, "sampleDataSources", {}).get(sampledata.SAMPLE_CATEGORY, [])
    if any(source.sampleName == sampledata.SAMPLE_NAME for source in existing):
        return  # already registered (module reload)
    if hasattr(logic, "registerCustomSampleDataCategory"):  # Slicer >= 5.12
        logic.registerCustomSampleDataCategory(sampledata.SAMPLE_CATEGORY, title=_("MedAnomaly"))
    thumbnail = sampledata.thumbnail_path()
    logic.registerCustomSampleDataSource(
        category=sampledata.SAMPLE_CATEGORY,
        sampleName=sampledata.SAMPLE_NAME,
        thumbnailFileName=str(thumbnail) if thumbnail.is_file() else None,
        uris=sampledata.file_uri(path),
        fileNames=sampledata.SAMPLE_FILE,
        checksums=sampledata.checksum(),
        nodeNames=sampledata.SAMPLE_NAME,
    )


#
# MedAnomalyParameterNode
#


@parameterNodeWrapper
class MedAnomalyParameterNode:
    """
    The parameters of the module (saved with the scene).

    inputVolume - the brain MRI volume to examine.
    brainMask - optional brain mask on the input's grid (found automatically when empty).
    method - name of the bundle that detects.
    device - "cpu" or "cuda".
    threshold - anomaly score above which a voxel is in the Anomaly segment.
    useCalibratedThreshold - use the method's calibrated threshold instead of `threshold`.
    loadPseudoHealthy - also load the pseudo-healthy reconstruction.
    keepPreviousResults - each run adds new nodes instead of replacing the selected outputs.
    heatmapVolume, anomalySegmentation, pseudoHealthyVolume - the outputs (replaced on the next run).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    brainMask: vtkMRMLLabelMapVolumeNode
    method: str = ""
    device: str = "cpu"
    threshold: float = 0.1
    useCalibratedThreshold: bool = True
    loadPseudoHealthy: bool = False
    keepPreviousResults: bool = False
    heatmapVolume: vtkMRMLScalarVolumeNode
    anomalySegmentation: vtkMRMLSegmentationNode
    pseudoHealthyVolume: vtkMRMLScalarVolumeNode


#
# MedAnomalyWidget
#


class MedAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    POLL_INTERVAL_MS = 200
    THRESHOLD_DELAY_MS = 250

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGui = False
        self._methods = {}
        self._task = None
        self._taskOutputs = None
        self._pollTimer = None
        self._thresholdTimer = None
        self._thresholdRangeMethod = None
        self._versionProblem = None

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedAnomalyLogic()
        self.logic.logCallback = self.addLog

        # Timers: the background process is polled, threshold changes are applied after a short pause.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPoll)
        self._thresholdTimer = qt.QTimer()
        self._thresholdTimer.setSingleShot(True)
        self._thresholdTimer.setInterval(self.THRESHOLD_DELAY_MS)
        self._thresholdTimer.connect("timeout()", self.onApplyThreshold)

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Widgets that are not connected through the parameter node wrapper (their choices are found at run time)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.resetThresholdButton.connect("clicked(bool)", self.onResetThreshold)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                             self.ui.segmentationShow3DButton.setSegmentationNode)

        # Advanced settings (stored in the application settings, not in the scene)
        self.ui.sourcePathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.sourcePathLineEdit.currentPath = self.logic.sourceFolder() or ""
        self.ui.sourcePathLineEdit.connect("currentPathChanged(QString)", self.onSourceFolderChanged)
        self.ui.bundleFoldersLineEdit.text = os.pathsep.join(self.logic.bundleFolders())
        self.ui.bundleFoldersLineEdit.connect("editingFinished()", self.onBundleFoldersChanged)
        self.ui.userModelsPathLabel.text = self.logic.userModelsFolder()

        # Buttons
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.installButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.refreshMethodsButton.connect("clicked(bool)", self.refreshMethods)

        self._versionProblem = versionProblem()
        self.populateDevices()
        self.refreshMethods()
        self.updateDependencyStatus()

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()
        self.updateRunningState()

        if self._versionProblem:  # too old a Slicer: say so where the user looks, and keep Apply disabled
            self.ui.statusLabel.text = self._versionProblem
            self.ui.statusLabel.setStyleSheet("color: #c00000; font-weight: bold")
            self.ui.installButton.enabled = False
            self.updateRunningState()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        for timer in (self._pollTimer, self._thresholdTimer):
            if timer:
                timer.stop()
        if self._task:
            self._task.cancel()
            self._task.cleanup()
            self._task = None
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module. A running detection goes on."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed: a running detection has lost its input."""
        if self._task:
            self.onCancelButton()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())

        # Select default input nodes if nothing is selected yet to save a few clicks for the user
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode
        if not self._parameterNode.method and self._methods:
            self._parameterNode.method = next(iter(self._methods))
        devices = [self.ui.deviceComboBox.itemData(i) for i in range(self.ui.deviceComboBox.count)]
        if self._parameterNode.device not in devices:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(0)
        self.updateGuiFromParameterNode()

    def setParameterNode(self, inputParameterNode) -> None:
        """Set and observe parameter node.
        Observation is needed because when the parameter node is changed then the GUI must be updated immediately.
        """
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Note: in the .ui file, a Qt dynamic property called "SlicerParameterName" is set on each
            # ui element that needs connection.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.updateGuiFromParameterNode()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self.updateGuiFromParameterNode()

    # ------------------------------------------------------------------------------------------
    # GUI <-> parameter node for the widgets the wrapper does not connect

    def currentMethod(self):
        return self._methods.get(self._parameterNode.method) if self._parameterNode else None

    def updateGuiFromParameterNode(self) -> None:
        if self._parameterNode is None or self._updatingGui:
            return
        self._updatingGui = True
        try:
            methodIndex = self.ui.methodComboBox.findData(self._parameterNode.method)
            if methodIndex >= 0:
                self.ui.methodComboBox.currentIndex = methodIndex
            deviceIndex = self.ui.deviceComboBox.findData(self._parameterNode.device)
            if deviceIndex >= 0:
                self.ui.deviceComboBox.currentIndex = deviceIndex
            method = self.currentMethod()
            if self._parameterNode.useCalibratedThreshold and method is not None and method.threshold is not None \
                    and abs(self._parameterNode.threshold - method.threshold) > 1e-12:
                self._parameterNode.threshold = method.threshold  # modifies the node: GUI follows below
            if method is not None and method.name != self._thresholdRangeMethod:
                # a method's scores have their own scale: fit the slider to its calibrated threshold
                self._thresholdRangeMethod = method.name
                calibrated = method.threshold
                self.setThresholdRange(calibrated if calibrated is not None else self._parameterNode.threshold)
            if self._parameterNode.threshold > self.ui.thresholdSlider.maximum:
                self.setThresholdRange(self._parameterNode.threshold)
            self.ui.thresholdSlider.value = self._parameterNode.threshold
            self.updateMethodInfo()
            self.updateThresholdInfo()
        finally:
            self._updatingGui = False
        self.updateRunningState()

    def updateMethodInfo(self) -> None:
        method = self.currentMethod()
        if method is None:
            if not self._methods:
                self.ui.methodInfoLabel.text = _(
                    "No methods found. Press 'Install / check dependencies' in the Advanced "
                    "section, or set the MedAnomaly source folder there.")
            else:
                self.ui.methodInfoLabel.text = ""
            return
        first = method.description.split(". ")[0].rstrip(".")
        weights = _("weights present") if method.has_weights else _("no weights: train the method first")
        if method.demo_weights:
            weights = _("demo weights (trained on the synthetic cohort)")
        if method.model_dir is not None:
            weights = _("your weights ({folder})").format(folder=method.model_dir)
        if method.contrast:
            weights += "; " + _("for {contrast} scans").format(contrast=method.contrast)
        self.ui.methodInfoLabel.text = f"{first}.\n{weights}"
        self.ui.methodInfoLabel.toolTip = method.tooltip

    def updateThresholdInfo(self) -> None:
        method = self.currentMethod()
        calibrated = None if method is None else method.threshold
        if self._parameterNode.useCalibratedThreshold:
            text = _("Calibrated on healthy scans.") if calibrated is not None else \
                _("This method has no calibrated threshold: the 99th percentile of the scan's scores is used.")
        else:
            text = _("Custom threshold.")
            if calibrated is not None:
                text += " " + _("Calibrated: {value:.4g}").format(value=calibrated)
        self.ui.thresholdInfoLabel.text = text
        self.ui.resetThresholdButton.enabled = not self._parameterNode.useCalibratedThreshold

    def setThresholdRange(self, threshold=None, heatmapMaximum=None) -> None:
        from MedAnomalyLib import results

        minimum, maximum, step, decimals = results.slider_range(threshold, heatmapMaximum)
        wasBlocked = self.ui.thresholdSlider.blockSignals(True)
        self.ui.thresholdSlider.decimals = decimals
        self.ui.thresholdSlider.minimum = minimum
        self.ui.thresholdSlider.maximum = maximum
        self.ui.thresholdSlider.singleStep = step
        self.ui.thresholdSlider.pageStep = step * 10
        self.ui.thresholdSlider.blockSignals(wasBlocked)

    def populateDevices(self) -> None:
        from MedAnomalyLib import environment

        wasBlocked = self.ui.deviceComboBox.blockSignals(True)
        self.ui.deviceComboBox.clear()
        for label, device in environment.device_choices():
            self.ui.deviceComboBox.addItem(label, device)
        self.ui.deviceComboBox.blockSignals(wasBlocked)

    def refreshMethods(self) -> None:
        """Fills the method selector from the bundles present (their weights, calibrated thresholds)."""
        self._methods = {method.key: method for method in self.logic.methods()}
        wasBlocked = self.ui.methodComboBox.blockSignals(True)
        self.ui.methodComboBox.clear()
        for method in self._methods.values():
            self.ui.methodComboBox.addItem(method.label, method.key)
            self.ui.methodComboBox.setItemData(self.ui.methodComboBox.count - 1, method.tooltip, qt.Qt.ToolTipRole)
        self.ui.methodComboBox.blockSignals(wasBlocked)
        if self._parameterNode is not None:
            if self._parameterNode.method not in self._methods and self._methods:
                self._parameterNode.method = next(iter(self._methods))
            self.updateGuiFromParameterNode()

    def updateDependencyStatus(self) -> None:
        from MedAnomalyLib import environment

        plan = self.logic.dependencyPlan()
        ready, sentence = environment.dependency_status(plan)
        if ready is None:  # unknown is never "all installed"
            text = _("Cannot check (the 'packaging' module is missing).")
        elif ready:
            text = _("All installed.")
        elif plan.problems:
            text = sentence
        else:
            text = _("Missing (installed on the first Apply, after asking): {what}")
            text = text.format(what="; ".join(plan.reasons))
        self.ui.dependenciesStatusLabel.text = text

    def onMethodChanged(self, index) -> None:
        if self._updatingGui or self._parameterNode is None or index < 0:
            return
        self._parameterNode.method = self.ui.methodComboBox.itemData(index)

    def onDeviceChanged(self, index) -> None:
        if self._updatingGui or self._parameterNode is None or index < 0:
            return
        self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def onThresholdChanged(self, value) -> None:
        if self._updatingGui or self._parameterNode is None:
            return
        self._parameterNode.useCalibratedThreshold = False
        self._parameterNode.threshold = value
        self._thresholdTimer.start()

    def onResetThreshold(self) -> None:
        self._parameterNode.useCalibratedThreshold = True
        method = self.currentMethod()
        if method is not None and method.threshold is not None:
            self._parameterNode.threshold = method.threshold
        self._thresholdTimer.start()

    def onApplyThreshold(self) -> None:
        """Updates the Anomaly segment from the heatmap at the current threshold (no network run)."""
        pn = self._parameterNode
        if self._task or pn is None or not pn.heatmapVolume or not pn.anomalySegmentation:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to update the segmentation."), waitCursor=True):
            count = self.logic.updateSegmentationFromHeatmap(pn.heatmapVolume, pn.anomalySegmentation, pn.threshold)
            self.ui.statusLabel.text = _("Threshold {threshold:.4g}: {count} voxels ({volume:.1f} ml) flagged.").format(
                threshold=pn.threshold, count=count, volume=count * self.logic.voxelVolumeMl(pn.heatmapVolume))

    def onSourceFolderChanged(self, path) -> None:
        self.logic.setSourceFolder(path)
        self.refreshMethods()
        self.updateDependencyStatus()

    def onBundleFoldersChanged(self) -> None:
        self.logic.setBundleFolders([p for p in self.ui.bundleFoldersLineEdit.text.split(os.pathsep) if p.strip()])
        self.refreshMethods()

    # ------------------------------------------------------------------------------------------
    # running

    def addLog(self, text) -> None:
        """Shows a line in the module panel's log."""
        self.ui.logTextEdit.appendPlainText(text)

    def canApply(self):
        """(possible, reason) of the Apply button."""
        if self._versionProblem:
            return False, self._versionProblem
        pn = self._parameterNode
        if pn is None or not pn.inputVolume:
            return False, _("Select an input volume.")
        method = self.currentMethod()
        if method is None:
            return False, _("Select a method (see the Advanced section if none is listed).")
        if not method.has_weights:
            return False, _("The method '{name}' has no trained weights.").format(name=method.name)
        if not pn.keepPreviousResults and pn.inputVolume in (pn.heatmapVolume, pn.pseudoHealthyVolume):
            return False, _("An output volume is the input volume: choose another output (or 'Create new').")
        return True, _("Detect anomalies in the input volume with the selected method.")

    def updateRunningState(self) -> None:
        running = self._task is not None
        possible, reason = self.canApply()
        self.ui.applyButton.enabled = possible and not running
        self.ui.applyButton.toolTip = reason
        self.ui.cancelButton.enabled = running
        self.ui.inputsCollapsibleButton.enabled = not running
        self.ui.outputsCollapsibleButton.enabled = not running
        self.ui.advancedCollapsibleButton.enabled = not running

    def onApplyButton(self) -> None:
        """Starts the detection in the background after making sure the Python packages are there."""
        if self._task:
            return
        pn = self._parameterNode
        self.ui.logTextEdit.clear()
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = ""
        with slicer.util.tryWithErrorDisplay(_("Failed to start the detection."), waitCursor=True):
            if self.logic.setupPythonRequirements(askConfirmation=True):
                self.refreshMethods()
                self.updateDependencyStatus()
            method = self.currentMethod()
            if method is None:
                raise RuntimeError(_("No method is selected (none was found: see the Advanced section)."))
            threshold = None if pn.useCalibratedThreshold else pn.threshold
            self._taskOutputs = (None, None, None) if pn.keepPreviousResults else (
                pn.heatmapVolume, pn.anomalySegmentation, pn.pseudoHealthyVolume)
            self._task = self.logic.startDetection(pn.inputVolume, method.name, device=pn.device, threshold=threshold,
                                                   brainMask=pn.brainMask, loadPseudoHealthy=pn.loadPseudoHealthy,
                                                   modelDir=method.model_dir)
            self.ui.statusLabel.text = _("Running {method} on {device}...").format(method=method.name, device=pn.device)
            self.updateRunningState()
            self._pollTimer.start()

    def onPoll(self) -> None:
        """Moves the process output into the log and the progress bar; loads results at the end."""
        if not self._task:
            self._pollTimer.stop()
            return
        update = self._task.job.poll()
        for line in update.lines:
            self.ui.logTextEdit.appendPlainText(line)
        if update.fraction is not None:
            self.ui.progressBar.value = int(round(100 * update.fraction))
            self.ui.statusLabel.text = update.message
        if update.finished:
            self._pollTimer.stop()
            self.onDetectionFinished()

    def onDetectionFinished(self) -> None:
        from MedAnomalyLib.inference import DetectionCancelled, DetectionError

        task, self._task = self._task, None
        pn = self._parameterNode
        try:
            heatmapVolume, segmentation, pseudoHealthyVolume = self._taskOutputs
            outputs = self.logic.finishDetection(task, heatmapVolume=heatmapVolume, segmentation=segmentation,
                                                 pseudoHealthyVolume=pseudoHealthyVolume)
            if pn is not None:
                pn.heatmapVolume = outputs.heatmapVolume
                pn.anomalySegmentation = outputs.segmentation
                if outputs.pseudoHealthyVolume:
                    pn.pseudoHealthyVolume = outputs.pseudoHealthyVolume
                self.setThresholdRange(outputs.threshold, outputs.heatmapMaximum)
                self._updatingGui = True
                try:
                    pn.threshold = outputs.threshold
                finally:
                    self._updatingGui = False
                self.updateGuiFromParameterNode()
            self.ui.progressBar.value = 100
            done = _("Done in {seconds:.0f} s: {count} voxels ({volume:.1f} ml) above {threshold:.4g}.")
            volumeMl = outputs.voxelCount * self.logic.voxelVolumeMl(outputs.heatmapVolume)
            self.ui.statusLabel.text = done.format(seconds=task.job.elapsed, count=outputs.voxelCount, volume=volumeMl,
                                                   threshold=outputs.threshold)
        except DetectionCancelled:
            self.ui.statusLabel.text = _("Cancelled. The scene is unchanged.")
        except DetectionError as error:
            self.ui.statusLabel.text = _("Failed: {message}").format(message=error.message)
            slicer.util.errorDisplay(_("MedAnomaly detection failed:\n\n{message}").format(message=error.message),
                                     detailedText=error.log or task.job.log)
        except Exception as error:
            logging.exception("MedAnomaly: loading the results failed")
            self.ui.statusLabel.text = _("Failed: {message}").format(message=str(error))
            message = _("MedAnomaly could not load the results:\n\n{message}").format(message=str(error))
            slicer.util.errorDisplay(message, detailedText=task.job.log)
        finally:
            task.cleanup()
            self._taskOutputs = None
            self.updateRunningState()

    def onCancelButton(self) -> None:
        """Ends the background process tree; the poll timer then reports the cancellation."""
        if not self._task:
            return
        self.ui.statusLabel.text = _("Cancelling...")
        slicer.app.processEvents()
        self._task.cancel()
        if not self._pollTimer.isActive():
            self.onPoll()

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to install the Python packages."), waitCursor=True):
            installed = self.logic.setupPythonRequirements(askConfirmation=True)
            if not installed:
                slicer.util.infoDisplay(_("All Python packages MedAnomaly needs are installed."))
        self.refreshMethods()
        self.updateDependencyStatus()


#
# MedAnomalyLogic
#


class DetectionTask:
    """A detection started by `MedAnomalyLogic.startDetection`: its process, work folder and settings."""

    def __init__(self, job, workFolder, inputVolumeID, method, device, loadPseudoHealthy, keepFiles=False):
        self.job, self.workFolder = job, workFolder
        self.inputVolumeID, self.method, self.device = inputVolumeID, method, device
        self.loadPseudoHealthy, self.keepFiles = loadPseudoHealthy, keepFiles

    def cancel(self):
        self.job.cancel(grace_seconds=2.0)

    def cleanup(self):
        if self.job.returncode is None:
            self.job.cancel(grace_seconds=2.0)
        if not self.keepFiles:
            self.workFolder.remove()


class DetectionOutputs:
    """The nodes a detection produced (or replaced)."""

    def __init__(self, heatmapVolume, segmentation, pseudoHealthyVolume, threshold, voxelCount, heatmapMaximum,
                 volumeScore):
        self.heatmapVolume, self.segmentation = heatmapVolume, segmentation
        self.pseudoHealthyVolume, self.threshold, self.voxelCount = pseudoHealthyVolume, threshold, voxelCount
        self.heatmapMaximum, self.volumeScore = heatmapMaximum, volumeScore


class MedAnomalyLogic(ScriptedLoadableModuleLogic):
    """This class should implement all the actual
    computation done by your module.  The interface
    should be such that other python code can import
    this class and make use of the functionality without
    requiring an instance of the Widget.
    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py

    Scripted use (blocks until the result is in the scene)::

        import MedAnomaly
        logic = MedAnomaly.MedAnomalyLogic()
        logic.setupPythonRequirements()
        outputs = logic.process(volumeNode, "dae", device="cpu")
        logic.updateSegmentationFromHeatmap(outputs.heatmapVolume, outputs.segmentation, 0.2)
    """

    SOURCE_FOLDER_SETTING = "MedAnomaly/SourceFolder"
    BUNDLE_FOLDERS_SETTING = "MedAnomaly/BundleFolders"
    TERMINOLOGY_FILE = "SegmentationCategoryTypeModifier-MedAnomaly.term.json"

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback = None
        self.restartNeeded = []  # "name old -> new" of loaded packages the last installation changed
        self._terminologyLoaded = False
        self.prepareEnvironment()

    def getParameterNode(self):
        return MedAnomalyParameterNode(super().getParameterNode())

    def log(self, text) -> None:
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    # ------------------------------------------------------------------------------------------
    # where medanomaly and the bundles come from, and what Slicer's Python needs

    def sourceFolder(self):
        """The MedAnomaly source: the checkout set in the settings, else the copy the extension ships
        in its resources, else the checkout this module sits in."""
        from MedAnomalyLib import environment

        configured = qt.QSettings().value(self.SOURCE_FOLDER_SETTING, "")
        folder = environment.find_source_folder(configured=configured or None)
        return str(folder) if folder else None

    def setSourceFolder(self, path) -> None:
        qt.QSettings().setValue(self.SOURCE_FOLDER_SETTING, path or "")
        self.prepareEnvironment()

    def bundleFolders(self):
        value = qt.QSettings().value(self.BUNDLE_FOLDERS_SETTING, "")
        return [p for p in str(value or "").split(os.pathsep) if p.strip()]

    def setBundleFolders(self, folders) -> None:
        qt.QSettings().setValue(self.BUNDLE_FOLDERS_SETTING, os.pathsep.join(folders))
        self.prepareEnvironment()

    def userModelsFolder(self):
        """Where a user's own weights go: ``<Slicer settings folder>/MedAnomaly/models/<bundle>/``."""
        from MedAnomalyLib import environment

        settingsFolder = os.path.dirname(slicer.app.slicerUserSettingsFilePath)
        return str(environment.user_models_folder(settingsFolder))

    def prepareEnvironment(self) -> dict:
        """Makes the torch-free ``medanomaly.bundles`` importable here (from the source folder when
        the package is not installed yet) and puts the extra bundle folders and the source's bundles
        (the shipped ones in an installed extension) on the bundle search path, for this process and
        the bundle processes. Returns the extra environment of the bundle process."""
        from MedAnomalyLib import environment

        source = self.sourceFolder()
        environment.make_importable(source)
        return environment.apply_bundle_path(self.bundleFolders(), source)

    def dependencyPlan(self):
        """What Slicer's Python still lacks (`MedAnomalyLib.environment.InstallPlan`), None if unknown."""
        from MedAnomalyLib import environment

        try:
            return environment.install_plan(self.sourceFolder())
        except ImportError:
            return None

    def setupPythonRequirements(self, askConfirmation=True) -> bool:
        """Installs what is missing: PyTorch (through the PyTorch extension when it is installed),
        the other packages with pip, then medanomaly itself from its source folder (the copy the
        extension ships, or a checkout). Every pip run gets a constraints file pinning the numpy,
        scipy and SimpleITK that Slicer has, so they never change. Asks first. Returns True if
        anything was installed; raises if the user declines or it fails, if this Slicer is too old,
        or if the packages cannot be checked (never "all installed" then). When a package Slicer
        had already imported changed, says that Slicer must be restarted (`restartNeeded`)."""
        import importlib

        from MedAnomalyLib import environment

        problem = versionProblem()
        if problem:
            raise RuntimeError(problem)
        plan = self.dependencyPlan()
        if not environment.needs_install(plan):  # raises DependencyError for an unknown plan or problems
            return False
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("MedAnomaly needs Python packages that are not installed in Slicer yet. Installing needs a network "
                  "connection and may take several minutes. Install them now?"),
                _("MedAnomaly: install Python packages"), detailedText=plan.summary()):
            message = _("MedAnomaly cannot run without these Python packages:\n{what}")
            raise RuntimeError(message.format(what="\n".join(plan.reasons)))

        before = environment.installed_versions()  # read now: what Slicer has at this moment
        pins = environment.slicer_pins(before)
        loaded = environment.loaded_distributions()
        with environment.constraints_file(pins) as constraints:
            if plan.torch:
                self.log(_("Installing PyTorch (this may take several minutes)..."))
                self._installTorch(plan.torch, constraints, pins)
            if plan.packages:
                self.log(_("Installing {packages}...").format(packages=", ".join(plan.packages)))
                self._pipInstall(plan.packages, constraints, pins)
            if plan.medanomaly:
                self.log(_("Installing medanomaly from {source}...").format(source=plan.source))
                if environment.is_shipped(plan.source):  # built from a temporary copy: the extension stays as it is
                    with environment.staged_source(plan.source) as staged:
                        arguments = [str(staged) if a == str(plan.source) else a for a in plan.medanomaly]
                        self._pipInstall(arguments, constraints, pins)
                else:
                    self._pipInstall(plan.medanomaly, constraints, pins)
        importlib.invalidate_caches()
        after = environment.installed_versions()
        pinnedChanges = environment.changed_versions(before, after, only={environment.canonical(n) for n in pins})
        if pinnedChanges:  # only an installer that ignored the constraints gets here
            logging.error(f"MedAnomaly: packages of Slicer were changed: {pinnedChanges}")
        self.restartNeeded = environment.changed_versions(before, after, only=loaded)
        self.prepareEnvironment()

        remaining = self.dependencyPlan()
        if environment.needs_install(remaining):
            raise RuntimeError(_("Some packages are still missing after the installation:\n{what}\n"
                                 "Restart Slicer and try again.").format(what="\n".join(remaining.reasons)))
        self.log(_("Python packages are installed."))
        if self.restartNeeded:
            message = _("The installation updated packages that Slicer had already loaded:\n{what}\n\n"
                        "Restart Slicer before going on, so that it uses them.").format(
                what="\n".join(self.restartNeeded))
            self.log(message)
            if askConfirmation and slicer.util.confirmYesNoDisplay(message + "\n\n" + _("Restart now?"),
                                                                   _("MedAnomaly: restart Slicer")):
                slicer.util.restart()
        return True

    def _pipInstall(self, requirements, constraints, pins) -> None:
        """``pip install --constraint <Slicer's versions> ...`` in Slicer's Python."""
        from MedAnomalyLib import environment

        arguments = environment.pip_install_arguments(requirements, constraints, pins)
        self.log("pip install " + " ".join(arguments))
        try:
            slicer.util.pip_install(arguments)
        except Exception as error:
            pinned = ", ".join(f"{name} {version}" for name, version in pins.items())
            raise RuntimeError(_("Installing {what} failed ({error}). MedAnomaly never changes the packages Slicer "
                                 "is built with ({pinned}): if a package needs other versions of them, it cannot "
                                 "be installed in this Slicer. The Python console shows pip's output.").format(
                what=" ".join(requirements), error=error, pinned=pinned)) from error

    def _installTorch(self, requirements, constraints, pins) -> None:
        from MedAnomalyLib import environment

        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            PyTorchUtils = None
        if PyTorchUtils is not None:
            # light-the-torch picks the build that fits the computer's CUDA driver; it runs pip, which
            # reads the constraints from $PIP_CONSTRAINT
            with environment.pip_constraint_environment(constraints):
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=environment.TORCH_REQUIREMENT,
                    torchvisionVersionRequirement=environment.TORCHVISION_REQUIREMENT)
            if torch is None:
                raise RuntimeError(_("PyTorch could not be installed. Install it with the PyTorch Utils module."))
        else:
            self.log(_("The PyTorch extension is not installed: installing PyTorch from the package index."))
            self._pipInstall(requirements, constraints, pins)

    def methods(self):
        """The bundles present (`MedAnomalyLib.inference.Method`), [] while medanomaly is unavailable
        (or cannot run in this Slicer)."""
        if versionProblem():
            return []
        self.prepareEnvironment()
        try:
            from MedAnomalyLib import inference
        except ImportError as error:
            logging.info(f"MedAnomaly methods are not available yet (medanomaly is not installed): {error}")
            return []
        try:
            return inference.available_methods(self.userModelsFolder())
        except Exception as error:
            logging.warning(f"MedAnomaly could not read the bundles: {error}")
            return []

    def method(self, name):
        """A method by its key: a bundle's name (its own weights) or ``<bundle>:user[/<name>]``."""
        from MedAnomalyLib import inference

        return inference.method_by_name(name, self.userModelsFolder())

    # ------------------------------------------------------------------------------------------
    # detection

    def startDetection(self, inputVolume, method, device="cpu", threshold=None, brainMask=None,
                       loadPseudoHealthy=False, keepFiles=False, modelDir=None) -> DetectionTask:
        """Writes the input to a work folder and starts the bundle's inference in the background.

        Does not change the scene. Raises `InputError` / `DetectionError` with a sentence for the user.
        """
        from MedAnomalyLib import inputs

        problem = versionProblem()
        if problem:
            raise RuntimeError(problem)
        if not inputVolume:
            raise inputs.InputError(_("Select an input volume."))
        imageData = inputVolume.GetImageData()
        inputs.check_input(imageData.GetDimensions() if imageData else None,
                           imageData.GetNumberOfScalarComponents() if imageData else 1,
                           name=_("The volume '{name}'").format(name=inputVolume.GetName()))
        if brainMask:
            maskData = brainMask.GetImageData()
            inputs.check_input(maskData.GetDimensions() if maskData else None, 1,
                               name=_("The brain mask '{name}'").format(name=brainMask.GetName()))
            inputs.check_same_grid(imageData.GetDimensions(), self._ijkToRas(inputVolume),
                                   maskData.GetDimensions(), self._ijkToRas(brainMask))
        extraEnvironment = self.prepareEnvironment()
        from MedAnomalyLib import environment, inference

        workFolder = inference.WorkFolder.create(slicer.app.temporaryPath)
        try:
            self._writeVolume(inputVolume, workFolder.input_file)
            if brainMask:
                self._writeVolume(brainMask, workFolder.mask_file)
            request = inference.DetectionRequest(
                method=method, input_file=workFolder.input_file, output_dir=workFolder.output_dir, device=device,
                threshold=threshold, mask_file=workFolder.mask_file if brainMask else None,
                python=environment.python_executable(), model_dir=modelDir)
            inference.check_ready(request)
            self.log(_("Running: {command}").format(command=" ".join(request.command())))
            job = inference.DetectionJob.start(request, env=extraEnvironment)
        except Exception:
            workFolder.remove()
            raise
        return DetectionTask(job, workFolder, inputVolume.GetID(), method, device, loadPseudoHealthy, keepFiles)

    def finishDetection(self, task, heatmapVolume=None, segmentation=None, pseudoHealthyVolume=None,
                        show=True) -> DetectionOutputs:
        """Loads the results of a finished task into the scene, whole or not at all.

        First every output file is read into new nodes and checked (grid, segment, scores); only
        then do the output nodes change: given ones are replaced (only the "Anomaly" segment of a
        segmentation), missing ones are created next to the input in the subject hierarchy. If
        anything fails (or is interrupted), every node added here is removed and every given
        node is restored (`MedAnomalyLib.results.SceneTransaction`). Given nodes that were
        removed from the scene while the detection ran are created anew.
        """
        from MedAnomalyLib import inference, results

        result = task.job.result()  # raises DetectionError / DetectionCancelled with the log
        inputVolume = slicer.mrmlScene.GetNodeByID(task.inputVolumeID)
        if inputVolume is None:
            message = _("The input volume was removed from the scene while the detection ran.")
            raise inference.DetectionError(message, task.job.log)
        heatmapVolume, segmentation, pseudoHealthyVolume = (
            node if node is not None and slicer.mrmlScene.IsNodePresent(node) else None
            for node in (heatmapVolume, segmentation, pseudoHealthyVolume))

        with results.SceneTransaction(slicer.mrmlScene) as transaction:
            # 1. read and check every output in new nodes; nothing that existed changes yet
            loaded = self._readOutputs(task, result, inputVolume)
            # 2. only now: the outputs become (or replace the content of) the output nodes
            baseName = f"{inputVolume.GetName()} {task.method}"
            temporary = []  # loaded nodes whose content moved into given nodes
            heatmapVolume = self._adoptVolume(loaded["heatmap"], heatmapVolume, f"{baseName} anomaly heatmap",
                                              inputVolume, transaction, temporary)
            if loaded["pseudoHealthy"] is not None:
                pseudoHealthyVolume = self._adoptVolume(loaded["pseudoHealthy"], pseudoHealthyVolume,
                                                        f"{baseName} pseudo-healthy", inputVolume, transaction,
                                                        temporary)
            else:
                pseudoHealthyVolume = None
            segmentation = self._adoptSegmentation(loaded["segmentation"], segmentation, f"{baseName} anomaly",
                                                   inputVolume, transaction, temporary)
            for node in temporary:
                results.remove_nodes(slicer.mrmlScene, results.node_with_display_and_storage(node))

        threshold = loaded["threshold"]
        if show:
            self.showResults(inputVolume, heatmapVolume, segmentation, threshold)
        self.log(_("Results: {heatmap}, {segmentation} ({count} voxels above {threshold:.4g}).").format(
            heatmap=heatmapVolume.GetName(), segmentation=segmentation.GetName(), count=loaded["voxelCount"],
            threshold=threshold))
        return DetectionOutputs(heatmapVolume, segmentation, pseudoHealthyVolume, threshold, loaded["voxelCount"],
                                loaded["heatmapMaximum"], result.volume_score)

    def _readOutputs(self, task, result, inputVolume) -> dict:
        """Every output file of `result` in new nodes, checked: the heatmap (and pseudo-healthy volume)
        on the input's grid with finite scores, a segmentation with its anomaly segment (made from the
        heatmap when the method has no threshold), the threshold and the number of voxels above it."""
        from MedAnomalyLib import inference, results

        heatmap = self._loadVolume(result.heatmap)
        self._checkGrid(heatmap, inputVolume, _("heatmap"))
        heatmapArray = slicer.util.arrayFromVolume(heatmap)
        try:
            results.check_heatmap(heatmapArray)
        except ValueError as error:
            raise inference.DetectionError(str(error), task.job.log) from None
        threshold = result.threshold
        if result.segmentation is not None:
            segmentation = self._loadSegmentation(result.segmentation)
            if not self._anomalySourceSegmentId(segmentation):
                raise inference.DetectionError(_("The segmentation {path} has no segment.").format(
                    path=result.segmentation), task.job.log)
        else:
            # no calibrated threshold and none given: flag about 1 % of the brain
            threshold = results.suggest_threshold(heatmapArray)
            self.log(_("No threshold from the method: using {threshold:.4g} (99th percentile of the brain's "
                       "scores).").format(threshold=threshold))
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "__MedAnomalyTemp__")
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
            self.updateSegmentationFromHeatmap(heatmap, segmentation, threshold)
        pseudoHealthy = None
        if task.loadPseudoHealthy and result.pseudo_healthy is not None:
            pseudoHealthy = self._loadVolume(result.pseudo_healthy)
            self._checkGrid(pseudoHealthy, inputVolume, _("pseudo-healthy volume"))
        return {"heatmap": heatmap, "segmentation": segmentation, "pseudoHealthy": pseudoHealthy,
                "threshold": threshold,
                "voxelCount": results.voxel_count(results.threshold_to_labelmap(heatmapArray, threshold)),
                "heatmapMaximum": float(heatmapArray.max())}

    def process(self, inputVolume, method, device="cpu", threshold=None, brainMask=None, loadPseudoHealthy=False,
                heatmapVolume=None, segmentation=None, pseudoHealthyVolume=None, show=True,
                timeout=None) -> DetectionOutputs:
        """Runs a detection to its end (blocking; still in a separate process, its log goes to
        `log`) and loads the results. For scripts and the self test."""
        task = self.startDetection(inputVolume, method, device=device, threshold=threshold, brainMask=brainMask,
                                   loadPseudoHealthy=loadPseudoHealthy)
        try:
            def onUpdate(update):
                for line in update.lines:
                    self.log(line)
                slicer.app.processEvents()

            task.job.wait(on_update=onUpdate, timeout=timeout)
            return self.finishDetection(task, heatmapVolume=heatmapVolume, segmentation=segmentation,
                                        pseudoHealthyVolume=pseudoHealthyVolume, show=show)
        finally:
            task.cleanup()

    # ------------------------------------------------------------------------------------------
    # threshold -> segmentation without running the network

    def anomalySegmentId(self, segmentationNode, create=True):
        """ID of the segmentation's "Anomaly" segment (created with its colour and terminology if missing)."""
        from MedAnomalyLib import results

        segmentationObject = segmentationNode.GetSegmentation()
        segmentId = segmentationObject.GetSegmentIdBySegmentName(results.SEGMENT_NAME)
        if not segmentId and create:
            segmentId = segmentationObject.AddEmptySegment("", results.SEGMENT_NAME, list(results.SEGMENT_COLOR))
        if segmentId:
            self._describeSegment(segmentationObject.GetSegment(segmentId))
        return segmentId

    def updateSegmentationFromHeatmap(self, heatmapVolume, segmentationNode, threshold) -> int:
        """Sets the "Anomaly" segment to the heatmap's voxels above `threshold`; returns their number."""
        from MedAnomalyLib import results

        labelmap = results.threshold_to_labelmap(slicer.util.arrayFromVolume(heatmapVolume), threshold)
        segmentId = self.anomalySegmentId(segmentationNode)
        labelmapNode = slicer.modules.volumes.logic().CreateAndAddLabelVolume(heatmapVolume, "__MedAnomalyTemp__")
        try:
            # same parent transform as the heatmap, so the import does not resample
            labelmapNode.SetAndObserveTransformNodeID(heatmapVolume.GetTransformNodeID())
            slicer.util.updateVolumeFromArray(labelmapNode, labelmap)
            segmentIds = vtk.vtkStringArray()
            segmentIds.InsertNextValue(segmentId)
            segmentationsLogic = slicer.modules.segmentations.logic()
            if not segmentationsLogic.ImportLabelmapToSegmentationNode(labelmapNode, segmentationNode, segmentIds):
                raise RuntimeError(_("The Anomaly segment could not be updated."))
        finally:
            slicer.mrmlScene.RemoveNode(labelmapNode)
        return results.voxel_count(labelmap)

    # ------------------------------------------------------------------------------------------
    # display

    def showResults(self, inputVolume, heatmapVolume, segmentation, threshold) -> None:
        """Heatmap with a heat colour table as the foreground over the input, segmentation outlined."""
        from MedAnomalyLib import results

        displayNode = heatmapVolume.GetDisplayNode()
        if displayNode is None:
            heatmapVolume.CreateDefaultDisplayNodes()
            displayNode = heatmapVolume.GetDisplayNode()
        for colorNodeID in results.HEAT_COLOR_NODE_IDS:
            if slicer.mrmlScene.GetNodeByID(colorNodeID):
                displayNode.SetAndObserveColorNodeID(colorNodeID)
                break
        heatmap = slicer.util.arrayFromVolume(heatmapVolume)
        low, high = results.display_window(heatmap, threshold)
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevelMinMax(low, high)
        # scores below a quarter of the threshold (and the background) are transparent
        displayNode.AutoThresholdOff()
        displayNode.SetThreshold(max(0.25 * float(threshold or 0.0), 1e-6 * high), max(float(heatmap.max()), high))
        displayNode.ApplyThresholdOn()
        slicer.util.setSliceViewerLayers(background=inputVolume, foreground=heatmapVolume, foregroundOpacity=0.5)
        segmentationDisplay = segmentation.GetDisplayNode()
        if segmentationDisplay is not None:
            segmentationDisplay.SetVisibility(True)
            segmentationDisplay.SetOpacity2DFill(0.25)
            segmentationDisplay.SetOpacity2DOutline(1.0)

    def voxelVolumeMl(self, volumeNode) -> float:
        spacing = volumeNode.GetSpacing()
        return spacing[0] * spacing[1] * spacing[2] / 1000.0

    # ------------------------------------------------------------------------------------------
    # helpers

    @staticmethod
    def _ijkToRas(volumeNode):
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return [[matrix.GetElement(row, column) for column in range(4)] for row in range(4)]

    def _writeVolume(self, volumeNode, path) -> None:
        """Writes a node to a file without touching the node's own storage (as it is, untransformed)."""
        from MedAnomalyLib import inference

        storageNode = slicer.mrmlScene.CreateNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storageNode.SetFileName(str(path))
            storageNode.UseCompressionOff()
            if not storageNode.WriteData(volumeNode) or not os.path.isfile(str(path)):
                raise inference.DetectionError(_("The volume '{name}' could not be written to {path}.").format(
                    name=volumeNode.GetName(), path=path))
        finally:
            storageNode.UnRegister(None)

    def _loadVolume(self, path):
        from MedAnomalyLib import inference

        try:
            node = slicer.util.loadVolume(str(path), {"show": False, "singleFile": True, "center": False})
        except RuntimeError:
            node = None
        if node is None:
            raise inference.DetectionError(_("The result {path} could not be read.").format(path=path))
        return node

    def _loadSegmentation(self, path):
        from MedAnomalyLib import inference

        try:
            node = slicer.util.loadSegmentation(str(path))
        except RuntimeError:
            node = None
        if node is None:
            raise inference.DetectionError(_("The segmentation {path} could not be read.").format(path=path))
        return node

    def _checkGrid(self, loaded, inputVolume, what) -> None:
        """The loaded output must lie on the input's grid: size and the whole IJK-to-RAS matrix."""
        from MedAnomalyLib import inference, inputs

        if not inputs.same_grid(inputVolume.GetImageData().GetDimensions(), self._ijkToRas(inputVolume),
                                loaded.GetImageData().GetDimensions(), self._ijkToRas(loaded)):
            raise inference.DetectionError(_("The {what} is not on the input's grid (size {a} vs {b}, or its "
                                             "spacing, origin or axes differ).").format(
                what=what, a=loaded.GetImageData().GetDimensions(), b=inputVolume.GetImageData().GetDimensions()))

    @staticmethod
    def _subjectHierarchyParent(node):
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        item = shNode.GetItemByDataNode(node)
        return shNode.GetItemParent(item) if item else None

    @staticmethod
    def _setSubjectHierarchyParent(node, parent) -> None:
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        item = shNode.GetItemByDataNode(node)
        if item and parent:
            shNode.SetItemParent(item, parent)

    def _placeBeside(self, node, referenceNode) -> None:
        """Same parent transform and subject hierarchy folder as `referenceNode`."""
        node.SetAndObserveTransformNodeID(referenceNode.GetTransformNodeID())
        self._setSubjectHierarchyParent(node, self._subjectHierarchyParent(referenceNode))

    def _undoPlacement(self, node, transaction) -> None:
        """Registers how `node` gets its parent transform and folder back if the transaction fails."""
        transformID, parent = node.GetTransformNodeID(), self._subjectHierarchyParent(node)

        def undo():
            node.SetAndObserveTransformNodeID(transformID)
            self._setSubjectHierarchyParent(node, parent)
        transaction.on_undo(undo)

    @staticmethod
    def _detachStorage(node) -> None:
        """The loaded node no longer refers to its temporary file (which is deleted): saving the
        scene writes it anew."""
        storageNode = node.GetStorageNode()
        if storageNode is not None:
            node.SetAndObserveStorageNodeID(None)
            slicer.mrmlScene.RemoveNode(storageNode)

    def _adoptVolume(self, loaded, target, name, inputVolume, transaction, temporary):
        """The loaded volume becomes the output: as a new node, or copied into `target` (whose
        image, geometry and place come back if the transaction fails)."""
        if target is None:
            loaded.SetName(slicer.mrmlScene.GenerateUniqueName(name))
            self._detachStorage(loaded)
            self._placeBeside(loaded, inputVolume)
            return loaded
        oldImage = target.GetImageData()
        oldIjkToRas = vtk.vtkMatrix4x4()
        target.GetIJKToRASMatrix(oldIjkToRas)

        def undo():
            target.SetAndObserveImageData(oldImage)
            target.SetIJKToRASMatrix(oldIjkToRas)
        transaction.on_undo(undo)
        self._undoPlacement(target, transaction)
        imageData = vtk.vtkImageData()
        imageData.DeepCopy(loaded.GetImageData())
        target.SetAndObserveImageData(imageData)
        target.CopyOrientation(loaded)
        self._placeBeside(target, inputVolume)
        temporary.append(loaded)
        return target

    def _prepareSegmentation(self, segmentation, inputVolume) -> None:
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        if segmentation.GetDisplayNode() is None:
            segmentation.CreateDefaultDisplayNodes()
        self._placeBeside(segmentation, inputVolume)

    @staticmethod
    def _anomalySourceSegmentId(segmentationNode):
        """The loaded segmentation's anomaly segment: the one named "Anomaly", else the first; None if empty."""
        from MedAnomalyLib import results

        segmentationObject = segmentationNode.GetSegmentation()
        if segmentationObject.GetNumberOfSegments() < 1:
            return None
        return (segmentationObject.GetSegmentIdBySegmentName(results.SEGMENT_NAME)
                or segmentationObject.GetNthSegmentID(0))

    def _adoptSegmentation(self, loaded, target, name, inputVolume, transaction, temporary):
        """The loaded segmentation becomes the output: as a new node, or its anomaly segment replaces
        the "Anomaly" segment of `target` (other segments stay; the old segment, the reference
        geometry and the place come back if the transaction fails)."""
        if target is None:
            loaded.SetName(slicer.mrmlScene.GenerateUniqueName(name))
            self._detachStorage(loaded)
            self._prepareSegmentation(loaded, inputVolume)
            self._describeSegment(loaded.GetSegmentation().GetSegment(self._anomalySourceSegmentId(loaded)))
            return loaded
        self._undoSegmentationChanges(target, transaction)
        self._prepareSegmentation(target, inputVolume)
        self._moveAnomalySegment(loaded, target)
        temporary.append(loaded)
        return target

    def _undoSegmentationChanges(self, segmentation, transaction) -> None:
        from MedAnomalyLib import results

        segmentationObject = segmentation.GetSegmentation()
        oldId = segmentationObject.GetSegmentIdBySegmentName(results.SEGMENT_NAME)
        backup, oldIndex = None, None
        if oldId:
            backup = slicer.vtkSegment()
            backup.DeepCopy(segmentationObject.GetSegment(oldId))
            oldIndex = segmentationObject.GetSegmentIndex(oldId)
        geometryName = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
        oldGeometry = segmentationObject.GetConversionParameter(geometryName)

        def undo():
            newId = segmentationObject.GetSegmentIdBySegmentName(results.SEGMENT_NAME)
            if newId:
                segmentationObject.RemoveSegment(newId)
            if backup is not None:
                segmentationObject.AddSegment(backup, oldId)
                segmentationObject.SetSegmentIndex(oldId, oldIndex)
            segmentationObject.SetConversionParameter(geometryName, oldGeometry)
        transaction.on_undo(undo)
        self._undoPlacement(segmentation, transaction)

    def _moveAnomalySegment(self, source, target) -> None:
        """Replaces the target's "Anomaly" segment with the loaded file's (other segments stay)."""
        from MedAnomalyLib import results

        sourceSegmentation = source.GetSegmentation()
        sourceId = self._anomalySourceSegmentId(source)
        if not sourceId:
            raise RuntimeError(_("The segmentation file has no segment."))
        targetSegmentation = target.GetSegmentation()
        oldId = targetSegmentation.GetSegmentIdBySegmentName(results.SEGMENT_NAME)
        if oldId:
            targetSegmentation.RemoveSegment(oldId)
        if not targetSegmentation.CopySegmentFromSegmentation(sourceSegmentation, sourceId, True):
            message = _("The Anomaly segment could not be copied into '{name}'.")
            raise RuntimeError(message.format(name=target.GetName()))
        self.anomalySegmentId(target, create=False)

    def _describeSegment(self, segment) -> None:
        """Name, colour and standard terminology (SNOMED CT: morphologically altered structure / lesion, brain)."""
        from MedAnomalyLib import results

        self._loadTerminology()
        segment.SetName(results.SEGMENT_NAME)
        segment.SetNameAutoGenerated(False)
        segment.SetColor(*results.SEGMENT_COLOR)
        segment.SetColorAutoGenerated(False)
        segment.SetTerminology(results.terminology_entry())

    def _loadTerminology(self) -> None:
        if self._terminologyLoaded:
            return
        path = moduleResourcePath(self.TERMINOLOGY_FILE)
        try:
            slicer.modules.terminologies.logic().LoadTerminologyFromFile(path)
        except Exception as error:  # the terminology only improves how the segment is described
            logging.warning(f"MedAnomaly terminology {path} was not loaded: {error}")
        self._terminologyLoaded = True


def moduleResourcePath(filename):
    """Path of a file in the module's Resources folder."""
    return os.path.join(os.path.dirname(__file__), "Resources", filename)


#
# MedAnomalyTest
#


class MedAnomalyTest(ScriptedLoadableModuleTest):
    """
    This is the test case for your scripted module.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        import unittest

        for test in (self.test_ThresholdUpdatesSegmentation, self.test_BadInputLeavesSceneUnchanged,
                     self.test_MedAnomalyDetection):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as reason:  # "Reload and Test" calls runTest outside a test runner
                self.delayDisplay(f"Skipped {test.__name__}: {reason}")

    def test_ThresholdUpdatesSegmentation(self):
        """Moving the threshold updates the Anomaly segment from the heatmap alone."""
        import numpy as np

        self.delayDisplay("Threshold -> segmentation")
        heatmap = np.zeros((20, 30, 40), dtype=np.float32)
        heatmap[5:15, 10:20, 10:30] = 0.2
        heatmap[8:12, 12:18, 15:25] = 0.6
        ijkToRas = np.diag([2.0, 1.5, 1.0, 1.0])
        heatmapVolume = slicer.util.addVolumeFromArray(heatmap, ijkToRas, name="heatmap")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "anomaly")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(heatmapVolume)
        logic = MedAnomalyLogic()
        for threshold, expected in ((0.1, 10 * 10 * 20), (0.5, 4 * 6 * 10), (0.9, 0)):
            count = logic.updateSegmentationFromHeatmap(heatmapVolume, segmentation, threshold)
            self.assertEqual(count, expected)
            segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Anomaly")
            self.assertTrue(segmentId)
            if expected:
                voxels = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, heatmapVolume)
                self.assertEqual(int(voxels.sum()), expected)
        segment = segmentation.GetSegmentation().GetSegment(segmentId)
        self.assertIn("52988006", segment.GetTerminology())  # SNOMED CT "Lesion"
        self.assertAlmostEqual(segment.GetColor()[0], 0.95)
        self.delayDisplay("Threshold test passed")

    def test_BadInputLeavesSceneUnchanged(self):
        """A 2D input is refused with a message before anything is written, and no node is added."""
        import numpy as np

        from MedAnomalyLib.inputs import InputError

        self.delayDisplay("Input checks")
        flat = slicer.util.addVolumeFromArray(np.ones((1, 32, 32), dtype=np.float32), name="flat")
        logic = MedAnomalyLogic()
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(InputError) as context:
            logic.startDetection(flat, "dae", device="cpu")
        self.assertIn("2D", str(context.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
        self.delayDisplay("Input test passed")

    def test_MedAnomalyDetection(self):
        """The dae bundle on the synthetic sample volume, on CPU: a heatmap on the input's grid and a
        non-empty Anomaly segment."""
        import SampleData

        from MedAnomalyLib import sampledata

        self.delayDisplay("Loading the sample volume")
        registerSampleData()
        inputVolume = SampleData.downloadSample(sampledata.SAMPLE_NAME)
        self.assertIsNotNone(inputVolume)
        self.assertEqual(inputVolume.GetImageData().GetDimensions()[2] > 1, True)

        logic = MedAnomalyLogic()
        logic.setupPythonRequirements(askConfirmation=False)
        method = logic.method("dae")
        if not method.has_weights:
            self.skipTest(f"The dae bundle has no weights in {method.root / 'models'}: train it first.")

        self.delayDisplay("Running the dae bundle on CPU (about a minute)")
        outputs = logic.process(inputVolume, "dae", device="cpu", timeout=1800)

        heatmap = outputs.heatmapVolume
        self.assertIsNotNone(heatmap)
        self.assertEqual(heatmap.GetImageData().GetDimensions(), inputVolume.GetImageData().GetDimensions())
        for heatmapRow, inputRow in zip(MedAnomalyLogic._ijkToRas(heatmap), MedAnomalyLogic._ijkToRas(inputVolume)):
            for heatmapValue, inputValue in zip(heatmapRow, inputRow):
                self.assertAlmostEqual(heatmapValue, inputValue, places=4)
        segmentation = outputs.segmentation
        segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Anomaly")
        self.assertTrue(segmentId)
        voxels = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, inputVolume)
        self.assertGreater(int(voxels.sum()), 0)

        # a higher threshold flags fewer voxels, without running the network
        higher = logic.updateSegmentationFromHeatmap(heatmap, segmentation, 2.0 * outputs.threshold)
        self.assertLessEqual(higher, outputs.voxelCount)
        self.delayDisplay("Detection test passed")
